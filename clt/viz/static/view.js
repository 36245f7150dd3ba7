/* The graph page's plot: which nodes and edges are shown, supernodes with summed edges, the
 * selected node's upstream/downstream set, and the plotly traces that draw them. */
'use strict';
var CLT = window.CLT = window.CLT || {};

(function () {
  var STYLE = {  // colour, symbol, name
    f: ['#f58518', 'circle', 'feature'], e: ['#b0b0b0', 'diamond', 'error'], t: ['#54a24b', 'square', 'token'],
    l: ['#4c78a8', 'hexagon', 'logit'], s: ['#9467bd', 'circle', 'supernode']};
  var EDGE_COLOURS = {1: '#2166ac', '-1': '#d6604d'}, WIDTHS = [0.7, 1.6, 3.0];

  function esc(text) {
    return String(text).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')
      .replace(/\n/g, '↵').replace(/\t/g, '⇥');
  }
  CLT.esc = esc;

  /* Nodes and summed edges of the current view (supernodes drawn as one node); kept until the
   * threshold, the hidden kinds, the supernodes or (in the pinned-subgraph view) the pins change. */
  CLT.display = function (app) {
    var S = app.state, v = S.view, bit = 1 << app.level();
    var key = [bit, !!v.hide_errors, !!v.subgraph_only, JSON.stringify(S.supernodes),
      v.subgraph_only ? JSON.stringify(S.pinned) : ''].join('|');
    if (app._display && app._display.key === key) { return app._display.value; }
    var value = build(app, bit);
    app._display = {key: key, value: value};
    return value;
  };

  function build(app, bit) {
    var m = app.model, N = app.D.nodes, S = app.state, v = S.view, n = m.n;
    var superOf = app.superOf(), pinned = app.pinnedBase();
    var items = [], dispOf = new Int32Array(n).fill(-1), i;
    function visible(i) {
      if (v.subgraph_only) { return pinned.has(i); }
      return (N.levels[i] & bit) && !(v.hide_errors && m.isError[i]);
    }
    for (i = 0; i < n; i++) {
      if (superOf[i] < 0 && visible(i)) {
        dispOf[i] = items.length;
        items.push({id: m.ids[i], base: i, kind: N.kind[i], x: N.x[i], y: N.y[i], size: N.size[i]});
      }
    }
    S.supernodes.forEach(function (sn, k) {
      var members = sn.members.map(function (id) { return m.index[id]; });
      var shown = v.subgraph_only ? S.pinned.indexOf(sn.id) >= 0 || members.some(function (j) { return pinned.has(j); })
        : members.some(visible);
      if (!shown) { return; }
      var x = 0, y = 0, size = 0;
      members.forEach(function (j) { x += N.x[j]; y += N.y[j]; size += N.size[j] * N.size[j]; dispOf[j] = items.length; });
      items.push({id: sn.id, base: -1, supernode: k, kind: 's', x: x / members.length, y: y / members.length,
        size: Math.min(30, Math.sqrt(size) + 2)});
    });
    var sums = new Map(), count = items.length, levelBit = bit;
    m.forEachEdge(function (t, s, w, levels) {
      var a = dispOf[s], b = dispOf[t];
      if (a < 0 || b < 0 || a === b) { return; }
      var key = a * count + b, edge = sums.get(key);
      if (edge === undefined) { edge = {source: a, target: b, w: 0, kept: false}; sums.set(key, edge); }
      edge.w += w;
      edge.kept = edge.kept || (levels & levelBit) !== 0 || v.subgraph_only;
    });
    var edges = Array.from(sums.values()).filter(function (e) { return e.kept && e.w !== 0; });
    return {items: items, dispOf: dispOf, edges: edges};
  }

  /* The edges drawn: every node's strongest inputs and outputs, plus all of the selected node's. */
  function drawnEdges(display, k, selected, mode) {
    var ins = [], outs = [], chosen = new Set();
    display.items.forEach(function () { ins.push([]); outs.push([]); });
    display.edges.forEach(function (e, j) { ins[e.target].push(j); outs[e.source].push(j); });
    function strongest(list, count) {
      list.sort(function (a, b) { return Math.abs(display.edges[b].w) - Math.abs(display.edges[a].w); });
      for (var j = 0; j < Math.min(count, list.length); j++) { chosen.add(list[j]); }
    }
    for (var i = 0; i < display.items.length; i++) { strongest(ins[i], k); strongest(outs[i], k); }
    if (selected >= 0) {
      if (mode !== 'down') { strongest(ins[selected], 60); }
      if (mode !== 'up') { strongest(outs[selected], 60); }
    }
    return Array.from(chosen).map(function (j) { return display.edges[j]; });
  }

  /* Display indices reachable from `start` over the kept edges (upstream, downstream or both). */
  function reach(display, start, mode) {
    var parents = [], children = [];
    display.items.forEach(function () { parents.push([]); children.push([]); });
    display.edges.forEach(function (e) { parents[e.target].push(e.source); children[e.source].push(e.target); });
    function walk(next) {
      var seen = new Set([start]), stack = [start];
      while (stack.length) {
        next[stack.pop()].forEach(function (j) { if (!seen.has(j)) { seen.add(j); stack.push(j); } });
      }
      return seen;
    }
    var up = mode === 'down' ? new Set([start]) : walk(parents);
    var down = mode === 'up' ? new Set([start]) : walk(children);
    return {up: up, down: down, all: new Set(Array.from(up).concat(Array.from(down)))};
  }

  function hover(app, item) {
    var N = app.D.nodes, label = app.labelOf(item.id), lines = ['<b>' + esc(item.id) + '</b>'];
    if (label) { lines.push(esc(label)); }
    if (item.base < 0) {
      lines.push('supernode of ' + app.state.supernodes[item.supernode].members.length + ' nodes');
      return lines.join('<br>');
    }
    var i = item.base, kind = STYLE[N.kind[i]][2];
    var where = N.layer[i] !== null ? 'layer ' + N.layer[i] + ', ' : '';
    lines.push(kind + ' · ' + where + 'pos ' + N.pos[i] + ' · token “' + esc(N.token[i]) + '”');
    if (N.kind[i] === 'l') { lines.push('probability: ' + N.act[i].toPrecision(4)); }
    else if (N.act[i] !== null) { lines.push('activation: ' + N.act[i].toPrecision(4)); }
    lines.push('influence: ' + N.infl[i].toPrecision(4));
    return lines.join('<br>');
  }

  /* In the pinned-subgraph view: the pinned nodes re-laid out on the positions they use only,
   * each cell's nodes spread across its column; returns the x axis that goes with it. */
  function compact(app, display) {
    var N = app.D.nodes, L = app.D.n_layers, cells = new Map(), positions = new Set(), logits = [];
    display.items.forEach(function (item) {
      var members = item.base >= 0 ? [item.base] : app.state.supernodes[item.supernode].members.map(function (id) {
        return app.model.index[id];
      });
      if (members.every(function (i) { return N.kind[i] === 'l'; })) { logits.push(item); return; }
      var pos = 0, row = 0;
      members.forEach(function (i) { pos += N.pos[i]; row += N.kind[i] === 't' ? 0 : N.layer[i] + 1; });
      item.cell = [Math.round(pos / members.length), Math.round(row / members.length)];
      positions.add(item.cell[0]);
    });
    var columns = Array.from(positions).sort(function (a, b) { return a - b; }), column = new Map();
    columns.forEach(function (p, c) { column.set(p, c); });
    display.items.forEach(function (item) {
      if (!item.cell) { return; }
      var key = item.cell.join(':');
      if (!cells.has(key)) { cells.set(key, []); }
      cells.get(key).push(item);
    });
    cells.forEach(function (members) {
      members.forEach(function (item, k) {
        item.x = column.get(item.cell[0]) + (members.length > 1 ? 0.8 * ((k + 0.5) / members.length - 0.5) : 0);
        item.y = item.cell[1];
        item.below = k % 2 === 1;
      });
    });
    logits.forEach(function (item, k) { item.x = columns.length; item.y = L + 1 - k * Math.min(1, (L + 1) / logits.length); });
    return {xaxis: Object.assign({}, app.layout.xaxis, {
      tickvals: columns.map(function (_, c) { return c; }),
      ticktext: columns.map(function (p) { return esc(app.D.tokens[p]); }),
      range: [-0.6, columns.length + 0.6]}),
      annotations: [Object.assign({}, app.layout.annotations[0], {x: columns.length})],
      shapes: [Object.assign({}, app.layout.shapes[0], {x0: columns.length - 0.5, x1: columns.length - 0.5})]};
  }

  /* The plotly traces of the current view (and, for the pinned-subgraph view, its x axis). */
  CLT.traces = function (app) {
    var display = CLT.display(app), v = app.state.view, selected = -1;
    var layout = v.subgraph_only ? compact(app, display) : {};
    if (app.selected !== null) {
      display.items.forEach(function (item, j) { if (item.id === app.selected) { selected = j; } });
    }
    var lit = selected >= 0 ? reach(display, selected, v.link_mode) : null;
    var edges = drawnEdges(display, v.subgraph_only ? Infinity : v.edges_per_node, selected, v.link_mode), top = 0;
    edges.forEach(function (e) { top = Math.max(top, Math.abs(e.w)); });
    var buckets = new Map();
    edges.forEach(function (e) {
      var sign = e.w > 0 ? 1 : -1, width = Math.min(2, Math.floor(3 * Math.sqrt(Math.abs(e.w) / (top || 1))));
      var bright = !lit || (v.link_mode !== 'down' && lit.up.has(e.source) && lit.up.has(e.target)) ||
        (v.link_mode !== 'up' && lit.down.has(e.source) && lit.down.has(e.target));
      var key = sign + ':' + width + ':' + (bright ? 1 : 0), b = buckets.get(key);
      if (!b) { b = {sign: sign, width: width, bright: bright, x: [], y: []}; buckets.set(key, b); }
      var a = display.items[e.source], c = display.items[e.target];
      b.x.push(a.x, c.x, null); b.y.push(a.y, c.y, null);
    });
    var traces = [];
    buckets.forEach(function (b) {
      traces.push({type: 'scatter', mode: 'lines', x: b.x, y: b.y, meta: 'edges', hoverinfo: 'skip', showlegend: false,
        opacity: b.bright ? (lit ? 0.85 : 0.5) : 0.06, line: {color: EDGE_COLOURS[b.sign], width: WIDTHS[b.width]}});
    });
    var pins = new Set(app.state.pinned);
    ['e', 't', 'f', 's', 'l'].forEach(function (kind) {
      var members = [];
      display.items.forEach(function (item, j) { if (item.kind === kind) { members.push(j); } });
      if (!members.length) { return; }
      var items = members.map(function (j) { return display.items[j]; });
      var withText = kind === 'l' || v.subgraph_only || kind === 's';
      traces.push({
        type: 'scatter', mode: withText ? 'markers+text' : 'markers', meta: 'nodes', name: STYLE[kind][2],
        x: items.map(function (it) { return it.x; }), y: items.map(function (it) { return it.y; }),
        customdata: items.map(function (it) { return it.id; }),
        hovertext: items.map(function (it) { return hover(app, it); }), hovertemplate: '%{hovertext}<extra></extra>',
        text: withText ? items.map(function (it) {
          return esc(kind === 'l' ? app.D.nodes.token[it.base] : CLT.nodeName(app, it.id));
        }) : undefined,
        textposition: kind === 'l' ? 'middle right' : items.map(function (it) { return it.below ? 'bottom center' : 'top center'; }),
        textfont: {size: 11},
        marker: {
          color: STYLE[kind][0], symbol: STYLE[kind][1],
          size: items.map(function (it) { return kind === 'e' ? 5 : it.size; }),
          opacity: members.map(function (j) { return !lit || lit.all.has(j) ? 0.92 : 0.15; }),
          line: {
            color: items.map(function (it) { return it.id === app.selected ? '#d62728' : '#222'; }),
            width: items.map(function (it) { return it.id === app.selected ? 3 : pins.has(it.id) ? 2.5 : 0.5; })
          }
        }
      });
    });
    return {traces: traces, display: display, lit: lit, layout: layout};
  };
})();
