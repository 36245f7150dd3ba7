"""The script of the graph page (`clt.viz.graph.graph_html`): clicking a node dims everything
outside its upstream and/or downstream set in the active threshold's traces."""

from __future__ import annotations

import json
from typing import Any


def script_json(data: Any) -> str:
    """JSON safe inside a <script> block: <, > and & become \\u escapes."""
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_CLICK_JS = """
var gd = document.getElementById('{plot_id}');
var D = %s;
gd.cltGraph = D;
var current = null, direction = 'both';
function activeGroup() {
  for (var g = 0; g < D.groups.length; g++) {
    var traces = D.groups[g].nodes;
    for (var j = 0; j < traces.length; j++) {
      if (gd.data[traces[j]].visible !== false) { return D.groups[g]; }
    }
  }
  return null;
}
function reset() {
  current = null;
  var nodes = [], edges = [];
  D.groups.forEach(function (g) { nodes = nodes.concat(g.nodes); edges = edges.concat(g.edges); });
  if (nodes.length) { Plotly.restyle(gd, {'marker.opacity': D.nodeOpacity}, nodes); }
  if (edges.length) { Plotly.restyle(gd, {opacity: D.edgeOpacity}, edges); }
  Plotly.restyle(gd, {x: [[], []], y: [[], []]}, D.highlight);
}
function reach(start, next) {
  var seen = {}, stack = [start];
  seen[start] = true;
  while (stack.length) {
    (next[stack.pop()] || []).forEach(function (n) {
      if (!seen[n]) { seen[n] = true; stack.push(n); }
    });
  }
  return seen;
}
function highlight(id) {
  var g = activeGroup();
  if (g === null) { return; }
  var parents = {}, children = {};
  g.links.forEach(function (l) {
    (parents[l[1]] = parents[l[1]] || []).push(l[0]);
    (children[l[0]] = children[l[0]] || []).push(l[1]);
  });
  var up = direction === 'down' ? {} : reach(id, parents);
  var down = direction === 'up' ? {} : reach(id, children);
  up[id] = true; down[id] = true;
  var opacity = g.nodes.map(function (t) {
    return gd.data[t].customdata.map(function (c) {
      return up[c] || down[c] ? D.nodeOpacity : D.dimNodes;
    });
  });
  Plotly.restyle(gd, {'marker.opacity': opacity}, g.nodes);
  if (g.edges.length) { Plotly.restyle(gd, {opacity: D.dimEdges}, g.edges); }
  var xs = [[], []], ys = [[], []];
  g.links.forEach(function (l) {
    if ((direction !== 'down' && up[l[1]]) || (direction !== 'up' && down[l[0]])) {
      var k = l[2] > 0 ? 0 : 1, a = g.pos[l[0]], b = g.pos[l[1]];
      xs[k].push(a[0], b[0], null);
      ys[k].push(a[1], b[1], null);
    }
  });
  Plotly.restyle(gd, {x: xs, y: ys}, D.highlight);
}
gd.on('plotly_click', function (event) {
  var point = event && event.points && event.points[0];
  if (!point || point.data.meta !== 'nodes') { return; }
  if (point.customdata === current) {
    reset();
  } else {
    current = point.customdata;
    highlight(current);
  }
});
gd.on('plotly_doubleclick', reset);
gd.on('plotly_sliderchange', reset);
gd.on('plotly_buttonclicked', function (event) {
  direction = D.directions[event.button.label] || 'both';
  if (current !== null) { highlight(current); }
});
"""


def click_script(data: dict[str, Any]) -> str:
    """The page script that highlights a clicked node's upstream/downstream set (`data`: `_build`'s)."""
    return _CLICK_JS % script_json(data)


__all__ = ["click_script", "script_json"]
