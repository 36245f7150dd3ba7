/* The graph page's side panels: the selected node and its feature card, its connections, the
 * pinned subgraph with its scores. All text goes in through textContent, never as HTML. */
'use strict';
var CLT = window.CLT = window.CLT || {};

(function () {
  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined && text !== null) { node.textContent = text; }
    return node;
  }
  function shown(token) { return String(token).replace(/\n/g, '↵').replace(/\t/g, '⇥'); }
  function kv(parent, key, value) {
    var p = el('div', 'clt-kv');
    p.appendChild(document.createTextNode(key + ': '));
    p.appendChild(el('b', null, value));
    parent.appendChild(p);
  }
  CLT.el = el;

  /* A short name of a node or supernode id. */
  CLT.nodeName = function (app, id) {
    var label = app.labelOf(id);
    if (label) { return label; }
    var i = app.model.index[id], N = app.D.nodes;
    if (i === undefined) { return id; }
    var token = '“' + shown(N.token[i]) + '”';
    switch (N.kind[i]) {
      case 'f': return 'L' + N.layer[i] + ' #' + N.feature[i] + ' at ' + token;
      case 'e': return 'error L' + N.layer[i] + ' at ' + token;
      case 't': return 'token ' + token;
      default: return 'logit ' + token;
    }
  };

  function card(parent, data) {
    kv(parent, 'density', (100 * data.density).toPrecision(3) + ' %');
    kv(parent, 'max activation', data.max_activation.toPrecision(4));
    var q = data.quantiles || {};
    if (q.q50 !== undefined) {
      kv(parent, 'quantiles (50/90/99 %)', [q.q50, q.q90, q.q99].map(function (x) { return x.toPrecision(3); }).join(' / '));
    }
    kv(parent, 'automatic label', data.label || '—');
    parent.appendChild(el('h3', null, 'Top contexts'));
    var contexts = el('div', 'clt-contexts');
    data.contexts.forEach(function (c) {
      var line = el('div', 'clt-context');
      line.appendChild(el('span', 'clt-act', c.activation.toPrecision(3)));
      c.tokens.forEach(function (token, j) {
        var span = el('span', j === c.focus ? 'clt-focus' : null, shown(token));
        var a = Math.max(0, c.activations[j]) / (data.max_activation || 1);
        span.style.background = 'rgba(245,133,24,' + Math.min(1, a).toFixed(3) + ')';
        span.title = String(c.activations[j]);
        line.appendChild(span);
      });
      contexts.appendChild(line);
    });
    if (!data.contexts.length) { contexts.appendChild(el('p', 'clt-muted', 'It never fired on the scanned tokens.')); }
    parent.appendChild(contexts);
    parent.appendChild(el('h3', null, 'Activation histogram'));
    var hist = el('div', 'clt-hist');
    parent.appendChild(hist);
    var edges = data.bin_edges, centres = data.histogram.map(function (_, j) { return (edges[j] + edges[j + 1]) / 2; });
    Plotly.newPlot(hist, [{type: 'bar', x: centres, y: data.histogram, marker: {color: '#f58518'}, hoverinfo: 'x+y'}],
      {margin: {t: 4, b: 28, l: 40, r: 4}, height: 120, bargap: 0.05, xaxis: {title: {text: ''}}},
      {displayModeBar: false, staticPlot: false});
    var logits = el('div', 'clt-logits');
    [['promotes', data.top_logits, 'clt-pos'], ['suppresses', data.bottom_logits, 'clt-neg']].forEach(function (part) {
      var column = el('div');
      column.appendChild(el('h3', null, part[0]));
      var list = el('ul', 'clt-list');
      part[1].forEach(function (pair) {
        var li = el('li');
        li.appendChild(el('span', 'clt-name clt-tok', shown(pair[0])));
        li.appendChild(el('span', 'clt-w ' + part[2], pair[1].toPrecision(3)));
        list.appendChild(li);
      });
      if (!part[1].length) { list.appendChild(el('li', 'clt-muted', '—')); }
      column.appendChild(list);
      logits.appendChild(column);
    });
    parent.appendChild(logits);
  }

  /* The node panel: what the node is, its editable label, its card (features) or members (supernodes). */
  CLT.renderNode = function (app) {
    var box = document.getElementById('clt-node'), id = app.selected, N = app.D.nodes;
    box.textContent = '';
    if (id === null) { box.appendChild(el('p', 'clt-muted', 'Click a node to see its feature card.')); return; }
    box.appendChild(el('div', 'clt-kv', CLT.nodeName(app, id)));
    box.appendChild(el('code', null, id));
    var input = el('input', 'clt-label-input');
    input.id = 'clt-label-input';
    input.type = 'text';
    input.placeholder = 'label (editable)';
    input.value = app.labelOf(id);
    input.addEventListener('change', function () { app.setLabel(id, input.value); });
    box.appendChild(input);
    var row = el('div', 'clt-row'), pin = el('button', null, app.state.pinned.indexOf(id) >= 0 ? 'unpin' : 'pin');
    pin.id = 'clt-pin-toggle';
    pin.type = 'button';
    pin.addEventListener('click', function () { app.togglePin(id); });
    row.appendChild(pin);
    box.appendChild(row);
    if (id.indexOf('supernode:') === 0) {
      var sn = app.supernode(id), ungroup = el('button', null, 'ungroup');
      ungroup.id = 'clt-ungroup';
      ungroup.type = 'button';
      ungroup.addEventListener('click', function () { app.ungroup(id); });
      row.appendChild(ungroup);
      box.appendChild(el('h3', null, 'Members'));
      box.appendChild(list(app, sn.members.map(function (member) { return [member, null]; })));
      return;
    }
    var i = app.model.index[id];
    kv(box, 'kind', {f: 'feature', e: 'error', t: 'token embedding', l: 'logit'}[N.kind[i]]);
    if (N.layer[i] !== null) { kv(box, 'layer', String(N.layer[i])); }
    kv(box, 'position', N.pos[i] + ' (token “' + shown(N.token[i]) + '”)');
    if (N.act[i] !== null) { kv(box, N.kind[i] === 'l' ? 'probability' : 'activation', N.act[i].toPrecision(4)); }
    kv(box, 'influence', N.infl[i].toPrecision(4));
    var data = N.card[i] ? app.D.cards[N.card[i]] : null;
    if (data) { card(box, data); } else if (N.kind[i] === 'f') { box.appendChild(el('p', 'clt-muted', 'No card was built for this feature.')); }
  };

  /* A clickable list of (id, weight) rows; weight null for none. */
  function list(app, rows) {
    var ul = el('ul', 'clt-list');
    rows.forEach(function (row) {
      var li = el('li');
      li.dataset.id = row[0];
      li.appendChild(el('span', 'clt-name', CLT.nodeName(app, row[0])));
      if (row[1] !== null) {
        li.dataset.weight = String(row[1]);
        li.appendChild(el('span', 'clt-w ' + (row[1] > 0 ? 'clt-pos' : 'clt-neg'), row[1].toPrecision(3)));
      }
      li.addEventListener('click', function () { app.select(row[0]); });
      ul.appendChild(li);
    });
    if (!rows.length) { ul.appendChild(el('li', 'clt-muted', 'none')); }
    return ul;
  }
  CLT.list = list;

  /* The connections panel: inputs and outputs of the selected node, summed over supernodes. */
  CLT.renderConnections = function (app) {
    var box = document.getElementById('clt-connections');
    box.textContent = '';
    if (app.selected === null) { box.appendChild(el('p', 'clt-muted', "The selected node's input and output edges.")); return; }
    var both = app.connections(app.selected);
    [['inputs', both.inputs, 'clt-inputs'], ['outputs', both.outputs, 'clt-outputs']].forEach(function (part) {
      box.appendChild(el('h3', null, part[0] + ' (' + part[1].length + ')'));
      var ul = list(app, part[1].slice(0, 40));
      ul.id = part[2];
      box.appendChild(ul);
    });
  };

  function score(id, value) {
    var cell = document.getElementById(id);
    cell.textContent = value === null ? '—' : value.toFixed(4);
    cell.dataset.value = value === null ? '' : String(value);
  }

  /* The subgraph panel: scores and the pinned nodes. */
  CLT.renderPins = function (app) {
    var g = app.D.graph_scores, page = app.pageScores(), pinned = app.pinnedScores();
    score('clt-score-graph-replacement', g[0]); score('clt-score-graph-completeness', g[1]);
    score('clt-score-page-replacement', page[0]); score('clt-score-page-completeness', page[1]);
    score('clt-score-pinned-replacement', pinned ? pinned[0] : null);
    score('clt-score-pinned-completeness', pinned ? pinned[1] : null);
    var box = document.getElementById('clt-pins');
    box.textContent = '';
    var ul = list(app, app.state.pinned.map(function (id) { return [id, null]; }));
    ul.id = 'clt-pinned';
    Array.prototype.forEach.call(ul.children, function (li) {
      if (!li.dataset.id) { return; }
      var x = el('span', 'clt-x', '×');
      x.title = 'unpin';
      x.addEventListener('click', function (event) { event.stopPropagation(); app.togglePin(li.dataset.id); });
      li.appendChild(x);
    });
    box.appendChild(ul);
  };
})();
