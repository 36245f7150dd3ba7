/* The graph page's application: state (pins, supernodes, labels, view), events, saving and loading.
 * The state's JSON is clt.attribution.state.GraphState's (format "clt.graph-state", version 1). */
'use strict';
var CLT = window.CLT = window.CLT || {};

(function () {
  var FORMAT = 'clt.graph-state', VERSION = 1;

  function App(D, layout, model, gd) {
    this.D = D;
    this.layout = layout;
    this.model = model;
    this.gd = gd;
    this.selected = null;
    this.state = this.emptyState();
    this._page = null;
  }

  App.prototype.emptyState = function () {
    return {pinned: [], supernodes: [], labels: {}, view: {
      node_threshold: this.D.levels[this.D.level], edges_per_node: this.D.edges_per_node, link_mode: 'both',
      hide_errors: false, subgraph_only: false, selected: null}};
  };

  App.prototype.level = function () {
    var levels = this.D.levels, want = this.state.view.node_threshold, best = this.D.level;
    for (var k = 0; k < levels.length; k++) {
      if (Math.abs(levels[k] - want) < Math.abs(levels[best] - want)) { best = k; }
    }
    return best;
  };

  /* Supernode index of each page node, -1 for none. */
  App.prototype.superOf = function () {
    var out = new Int32Array(this.model.n).fill(-1), index = this.model.index;
    this.state.supernodes.forEach(function (sn, k) { sn.members.forEach(function (id) { out[index[id]] = k; }); });
    return out;
  };

  App.prototype.supernode = function (id) {
    return this.state.supernodes.filter(function (sn) { return sn.id === id; })[0] || null;
  };

  /* Page node indices of the pinned nodes, supernodes replaced by their members. */
  App.prototype.pinnedBase = function () {
    var out = new Set(), app = this;
    this.state.pinned.forEach(function (id) {
      var sn = app.supernode(id);
      (sn ? sn.members : [id]).forEach(function (member) { out.add(app.model.index[member]); });
    });
    return out;
  };

  App.prototype.labelOf = function (id) {
    if (Object.prototype.hasOwnProperty.call(this.state.labels, id)) { return this.state.labels[id]; }
    var sn = this.supernode(id);
    if (sn) { return sn.label; }
    var i = this.model.index[id];
    return i === undefined ? '' : this.D.nodes.label[i];
  };

  App.prototype.setLabel = function (id, text) {
    var sn = this.supernode(id);
    if (sn) { sn.label = text; } else if (text) { this.state.labels[id] = text; } else { delete this.state.labels[id]; }
    this.render();
  };

  App.prototype.select = function (id) {
    this.selected = id;
    this.state.view.selected = id;
    this.render();
  };

  App.prototype.togglePin = function (id) {
    var k = this.state.pinned.indexOf(id);
    if (k >= 0) { this.state.pinned.splice(k, 1); } else { this.state.pinned.push(id); }
    this.render();
  };

  App.prototype.nextSupernodeId = function () {
    var top = 0;
    this.state.supernodes.forEach(function (sn) { top = Math.max(top, parseInt(sn.id.split(':')[1], 10) || 0); });
    return 'supernode:' + (top + 1);
  };

  /* Group nodes (ids; supernodes among them are dissolved into the new one) under a label. */
  App.prototype.group = function (ids, label) {
    var app = this, members = [], old = [];
    ids.forEach(function (id) {
      var sn = app.supernode(id);
      if (sn) { old.push(id); members = members.concat(sn.members); } else if (members.indexOf(id) < 0) { members.push(id); }
    });
    if (members.length < 2) { this.status('pin at least two nodes to group them'); return null; }
    var id = this.nextSupernodeId(), grouped = new Set(members.concat(old));
    this.state.supernodes = this.state.supernodes.filter(function (sn) { return old.indexOf(sn.id) < 0; });
    this.state.supernodes.push({id: id, label: label || 'group of ' + members.length, members: members});
    var wasPinned = this.state.pinned.some(function (p) { return grouped.has(p); });
    this.state.pinned = this.state.pinned.filter(function (p) { return !grouped.has(p); });
    if (wasPinned) { this.state.pinned.push(id); }
    this.selected = id;
    this.render();
    return id;
  };

  App.prototype.ungroup = function (id) {
    var sn = this.supernode(id);
    if (!sn) { return; }
    this.state.supernodes = this.state.supernodes.filter(function (s) { return s.id !== id; });
    var k = this.state.pinned.indexOf(id);
    if (k >= 0) { Array.prototype.splice.apply(this.state.pinned, [k, 1].concat(sn.members)); }
    if (this.selected === id) { this.selected = null; }
    this.render();
  };

  /* Apply the suggested groups (computed offline) to the nodes shown at this threshold. */
  App.prototype.autoGroup = function () {
    var app = this, bit = 1 << this.level(), superOf = this.superOf(), made = 0, N = this.D.nodes;
    this.D.suggestions.forEach(function (suggestion) {
      var members = suggestion[1].filter(function (id) {
        var i = app.model.index[id];
        return i !== undefined && superOf[i] < 0 && (N.levels[i] & bit);
      });
      if (members.length < 2) { return; }
      var id = app.nextSupernodeId();
      app.state.supernodes.push({id: id, label: suggestion[0], members: members});
      members.forEach(function (m) { superOf[app.model.index[m]] = 1; });
      made++;
    });
    this.status(made + ' supernodes made from ' + this.D.suggestions.length + ' suggestions');
    this.render();
  };

  /* Inputs and outputs [id, summed weight] of a node or supernode, strongest first. */
  App.prototype.connections = function (id) {
    var app = this, m = this.model, superOf = this.superOf(), sn = this.supernode(id);
    var members = (sn ? sn.members : [id]).map(function (x) { return m.index[x]; }), own = new Set(members);
    var keyOf = function (j) { return superOf[j] >= 0 ? app.state.supernodes[superOf[j]].id : m.ids[j]; };
    function collect(each) {
      var sums = new Map();
      members.forEach(function (i) {
        each.call(m, i, function (j, w) { if (!own.has(j)) { var k = keyOf(j); sums.set(k, (sums.get(k) || 0) + w); } });
      });
      return Array.from(sums.entries()).filter(function (e) { return e[1] !== 0; })
        .sort(function (a, b) { return Math.abs(b[1]) - Math.abs(a[1]); });
    }
    return {inputs: collect(m.forEachInput), outputs: collect(m.forEachOutput)};
  };

  App.prototype.pageScores = function () {
    if (!this._page) { this._page = this.model.scores(this.model.isFeature); }
    return this._page;
  };

  /* Scores of the pinned subgraph (prune.subgraph_scores of the pinned features); null without pins. */
  App.prototype.pinnedScores = function () {
    if (!this.state.pinned.length) { return null; }
    var base = Array.from(this.pinnedBase()).sort(function (a, b) { return a - b; }), key = base.join(',');
    if (this._pinned && this._pinned.key === key) { return this._pinned.value; }
    var keep = new Uint8Array(this.model.n);
    base.forEach(function (i) { keep[i] = 1; });
    this._pinned = {key: key, value: this.model.scores(keep)};
    return this._pinned.value;
  };

  /* The plot's width: the plot area's (without a scrollbar), at least 64 px per column; kept until
   * the window is resized, so that nodes stay where they are while panels change. */
  App.prototype.measure = function () {
    var wrap = document.getElementById('clt-plot-wrap');
    this.width = Math.max(wrap.getBoundingClientRect().width - 24, 64 * (this.D.tokens.length + 2));
  };

  App.prototype.status = function (text) { document.getElementById('clt-status').textContent = text; };

  App.prototype.render = function () {
    if (this.selected !== null && this.model.index[this.selected] === undefined && !this.supernode(this.selected)) {
      this.selected = null;
    }
    var built = CLT.traces(this);
    if (!this.width) { this.measure(); }
    var layout = Object.assign({}, this.layout, {width: this.width}, built.layout);
    Plotly.react(this.gd, built.traces, layout, {displaylogo: false, responsive: false, doubleClick: 'reset'});
    this.syncControls();
    CLT.renderNode(this);
    CLT.renderConnections(this);
    CLT.renderPins(this);
  };

  // ------------------------------------------------------------------ state files and URL

  App.prototype.stateObject = function () {
    var s = this.state;
    return {format: FORMAT, version: VERSION, prompt: this.D.prompt, pinned: s.pinned.slice(),
      supernodes: s.supernodes.map(function (sn) { return {id: sn.id, label: sn.label, members: sn.members.slice()}; }),
      labels: Object.assign({}, s.labels), view: Object.assign({}, s.view, {selected: this.selected})};
  };

  /* Take a saved state; ids this page does not have are dropped (and reported). */
  App.prototype.applyState = function (obj, source) {
    if (!obj || obj.format !== FORMAT || obj.version !== VERSION) {
      this.status(source + ': not a graph-page state (format ' + FORMAT + ', version ' + VERSION + ')');
      return false;
    }
    var index = this.model.index, dropped = 0, known = function (id) { var ok = index[id] !== undefined; dropped += ok ? 0 : 1; return ok; };
    var supernodes = (obj.supernodes || []).map(function (sn) {
      return {id: String(sn.id), label: String(sn.label), members: sn.members.map(String).filter(known)};
    }).filter(function (sn) { return sn.members.length >= 2; });
    var ids = new Set(supernodes.map(function (sn) { return sn.id; }));
    var state = this.emptyState();
    state.supernodes = supernodes;
    state.pinned = (obj.pinned || []).map(String).filter(function (id) { return ids.has(id) || known(id); });
    Object.keys(obj.labels || {}).forEach(function (id) { if (ids.has(id) || known(id)) { state.labels[id] = String(obj.labels[id]); } });
    Object.assign(state.view, obj.view || {});
    this.state = state;
    this.selected = state.view.selected && (ids.has(state.view.selected) || index[state.view.selected] !== undefined) ? state.view.selected : null;
    this.status('state loaded from ' + source + (dropped ? ' (' + dropped + ' unknown nodes left out)' : ''));
    this.render();
    return true;
  };

  function toBase64Url(text) {
    var bytes = new TextEncoder().encode(text), chunks = [];
    for (var i = 0; i < bytes.length; i += 0x8000) { chunks.push(String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000))); }
    return btoa(chunks.join('')).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  }
  function fromBase64Url(text) {
    var b64 = text.replace(/-/g, '+').replace(/_/g, '/');
    while (b64.length % 4) { b64 += '='; }
    var raw = atob(b64), bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { bytes[i] = raw.charCodeAt(i); }
    return new TextDecoder().decode(bytes);
  }

  /* Save: the URL fragment (#state=...) and a JSON file download. */
  App.prototype.save = function () {
    var text = JSON.stringify(this.stateObject(), null, 1);
    try { history.replaceState(null, '', '#state=' + toBase64Url(JSON.stringify(this.stateObject()))); } catch (e) { /* srcdoc frames */ }
    var link = document.createElement('a');
    link.href = URL.createObjectURL(new Blob([text], {type: 'application/json'}));
    link.download = 'graph-state.json';
    document.body.appendChild(link);
    link.click();
    link.remove();
    this.status('state saved to graph-state.json and to this page\'s URL');
  };

  App.prototype.loadFromHash = function () {
    var hash = window.location.hash || '', at = hash.indexOf('state=');
    if (at < 0) { return false; }
    try { return this.applyState(JSON.parse(fromBase64Url(hash.slice(at + 6).split('&')[0])), 'the URL'); }
    catch (e) { this.status('the URL fragment holds no readable state (' + e.message + ')'); return false; }
  };

  // ------------------------------------------------------------------ controls and events

  App.prototype.syncControls = function () {
    var v = this.state.view;
    document.getElementById('clt-level').value = String(this.level());
    document.getElementById('clt-edges').value = String(v.edges_per_node);
    document.getElementById('clt-link').value = v.link_mode;
    document.getElementById('clt-hide-errors').checked = !!v.hide_errors;
    document.getElementById('clt-subgraph-only').checked = !!v.subgraph_only;
  };

  App.prototype.start = function () {
    var app = this, D = this.D, view = function () { return app.state.view; };
    document.getElementById('clt-title').textContent = D.title;
    var select = document.getElementById('clt-level');
    D.levels.forEach(function (level, k) { var o = CLT.el('option', null, String(level)); o.value = String(k); select.appendChild(o); });
    select.addEventListener('change', function () { view().node_threshold = D.levels[+select.value]; app.render(); });
    var edges = document.getElementById('clt-edges');
    edges.addEventListener('change', function () { view().edges_per_node = Math.max(0, parseInt(edges.value, 10) || 0); app.render(); });
    var link = document.getElementById('clt-link');
    link.addEventListener('change', function () { view().link_mode = link.value; app.render(); });
    [['clt-hide-errors', 'hide_errors'], ['clt-subgraph-only', 'subgraph_only']].forEach(function (pair) {
      var box = document.getElementById(pair[0]);
      box.addEventListener('change', function () { view()[pair[1]] = box.checked; app.render(); });
    });
    document.getElementById('clt-group').addEventListener('click', function () {
      app.group(app.state.pinned.slice(), document.getElementById('clt-group-label').value.trim());
    });
    document.getElementById('clt-auto-group').addEventListener('click', function () { app.autoGroup(); });
    document.getElementById('clt-clear-pins').addEventListener('click', function () { app.state.pinned = []; app.render(); });
    document.getElementById('clt-save').addEventListener('click', function () { app.save(); });
    var load = document.getElementById('clt-load');
    load.addEventListener('change', function () {
      var file = load.files[0];
      if (!file) { return; }
      file.text().then(function (text) {
        try { app.applyState(JSON.parse(text), file.name); } catch (e) { app.status(file.name + ': ' + e.message); }
        load.value = '';
      });
    });
    if (!this.loadFromHash()) {
      if (D.state) { this.applyState(D.state, 'the page'); } else { this.render(); }
    }
    this.gd.on('plotly_click', function (event) {
      var point = event && event.points && event.points[0], mouse = (event && event.event) || {};
      if (!point) { return; }
      // plotly reports the point hovered last (its hover is throttled): take the node under the mouse
      var id = mouse.clientX !== undefined ? app.nodeAt(mouse.clientX, mouse.clientY) : null;
      if (id === null) { id = point.data.meta === 'nodes' ? point.customdata : null; }
      if (id === null) { return; }
      if (mouse.ctrlKey || mouse.metaKey) { app.togglePin(id); } else { app.select(id === app.selected ? null : id); }
    });
    document.addEventListener('keydown', function (event) {
      if (event.key === 'Escape' && event.target.tagName !== 'INPUT') { app.select(null); }
    });
    window.addEventListener('resize', function () { app.measure(); app.render(); });
  };

  /* The id of the node drawn nearest to a point (client coordinates) within its marker, or null. */
  App.prototype.nodeAt = function (clientX, clientY) {
    var full = this.gd._fullLayout, box = this.gd.getBoundingClientRect(), best = null, bestDistance = Infinity;
    var x = clientX - box.left - full.xaxis._offset, y = clientY - box.top - full.yaxis._offset;
    this.gd.data.forEach(function (trace) {
      if (trace.meta !== 'nodes') { return; }
      var sizes = trace.marker.size;
      trace.customdata.forEach(function (id, k) {
        var dx = full.xaxis.l2p(trace.x[k]) - x, dy = full.yaxis.l2p(trace.y[k]) - y;
        var distance = Math.sqrt(dx * dx + dy * dy), radius = Math.max(5, (Array.isArray(sizes) ? sizes[k] : sizes) / 2);
        if (distance <= radius + 1 && distance < bestDistance) { best = id; bestDistance = distance; }
      });
    });
    return best;
  };

  /* Where a node is drawn, in the window's client coordinates (scrolled into view): for tests. */
  App.prototype.clientPosition = function (id) {
    var full = this.gd._fullLayout, wrap = document.getElementById('clt-plot-wrap');
    var trace = this.gd.data.filter(function (t) { return t.meta === 'nodes' && t.customdata.indexOf(id) >= 0; })[0];
    if (!trace) { return null; }
    var k = trace.customdata.indexOf(id);
    var x = full.xaxis.l2p(trace.x[k]) + full.xaxis._offset, y = full.yaxis.l2p(trace.y[k]) + full.yaxis._offset;
    wrap.scrollLeft = Math.max(0, x - wrap.clientWidth / 2);
    wrap.scrollTop = Math.max(0, y - wrap.clientHeight / 2);
    var box = this.gd.getBoundingClientRect();
    return {x: box.left + x, y: box.top + y};
  };

  CLT.App = App;

  CLT.start = function () {
    var D = JSON.parse(document.getElementById('clt-data').textContent);
    var layout = JSON.parse(document.getElementById('clt-layout').textContent);
    var gd = document.getElementById('clt-plot');
    gd.cltGraph = D;
    var app = new App(D, layout, new CLT.Model(D), gd);
    window.cltApp = app;
    app.start();
    return app;
  };
  CLT.start();
})();
