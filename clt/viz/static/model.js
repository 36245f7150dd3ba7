/* The graph page's model: decoding the embedded data, the page matrix, subgraph scores.
 *
 * Page matrix: rows are the page's features and logits (rows[r] = page node index), columns the
 * page's features and tokens (block "features", the adjacency's own values) and the error nodes
 * (block "errors", float64: features not on the page are already merged into them). Entry
 * (t, s) is the direct effect of s on t; levels[k] bit j marks an edge kept by pruning at the
 * j-th node threshold. scores() is clt.attribution.prune.subgraph_scores on this matrix. */
'use strict';
var CLT = window.CLT = window.CLT || {};

(function () {
  var TYPES = {float32: Float32Array, float64: Float64Array, uint8: Uint8Array, uint16: Uint16Array,
    uint32: Uint32Array, int32: Int32Array};

  function decode(spec) {
    var text = atob(spec.data), bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) { bytes[i] = text.charCodeAt(i); }
    var Type = TYPES[spec.dtype];
    return new Type(bytes.buffer, 0, bytes.length / Type.BYTES_PER_ELEMENT);
  }

  function Model(D) {
    var N = D.nodes, n = N.id.length, m = this;
    this.D = D;
    this.n = n;
    this.ids = N.id;
    this.index = {};
    N.id.forEach(function (id, i) { m.index[id] = i; });
    this.isFeature = new Uint8Array(n);
    this.isError = new Uint8Array(n);
    this.isToken = new Uint8Array(n);
    this.w = new Float64Array(n);
    for (var i = 0; i < n; i++) {
      this.isFeature[i] = N.kind[i] === 'f' ? 1 : 0;
      this.isError[i] = N.kind[i] === 'e' ? 1 : 0;
      this.isToken[i] = N.kind[i] === 't' ? 1 : 0;
      if (N.kind[i] === 'l') { this.w[i] = N.act[i]; }
    }
    this.errOf = Int32Array.from(N.err);
    this.rows = Int32Array.from(D.rows);
    this.rowOf = new Int32Array(n).fill(-1);
    for (var r = 0; r < this.rows.length; r++) { this.rowOf[this.rows[r]] = r; }
    this.blocks = ['features', 'errors'].map(function (name) {
      var b = D.blocks[name];
      return {indptr: decode(b.indptr), indices: decode(b.indices), values: decode(b.values), levels: decode(b.levels)};
    });
    this._columns();
  }

  /* Column-major copy of both blocks: every node's output edges. */
  Model.prototype._columns = function () {
    var n = this.n, counts = new Int32Array(n + 1), m = this, total = 0;
    this.blocks.forEach(function (b) {
      for (var k = 0; k < b.indices.length; k++) { counts[b.indices[k] + 1]++; }
      total += b.indices.length;
    });
    for (var i = 0; i < n; i++) { counts[i + 1] += counts[i]; }
    var fill = counts.slice(0, n), target = new Int32Array(total), value = new Float64Array(total);
    var levels = new Uint8Array(total);
    this.blocks.forEach(function (b) {
      for (var r = 0; r < m.rows.length; r++) {
        for (var k = b.indptr[r]; k < b.indptr[r + 1]; k++) {
          var at = fill[b.indices[k]]++;
          target[at] = m.rows[r]; value[at] = b.values[k]; levels[at] = b.levels[k];
        }
      }
    });
    this.out = {ptr: counts, target: target, value: value, levels: levels};
  };

  /* fn(source, weight, levels) for every input edge of node t. */
  Model.prototype.forEachInput = function (t, fn) {
    var r = this.rowOf[t];
    if (r < 0) { return; }
    this.blocks.forEach(function (b) {
      for (var k = b.indptr[r]; k < b.indptr[r + 1]; k++) { fn(b.indices[k], b.values[k], b.levels[k]); }
    });
  };

  /* fn(target, weight, levels) for every output edge of node s. */
  Model.prototype.forEachOutput = function (s, fn) {
    var o = this.out;
    for (var k = o.ptr[s]; k < o.ptr[s + 1]; k++) { fn(o.target[k], o.value[k], o.levels[k]); }
  };

  /* fn(target, source, weight, levels) for every edge. */
  Model.prototype.forEachEdge = function (fn) {
    var rows = this.rows;
    this.blocks.forEach(function (b) {
      for (var r = 0; r < rows.length; r++) {
        for (var k = b.indptr[r]; k < b.indptr[r + 1]; k++) { fn(rows[r], b.indices[k], b.values[k], b.levels[k]); }
      }
    });
  };

  /* [replacement, completeness] of the subgraph keeping the features with keep[i] = 1: every
   * other feature is merged into its error node (prune.subgraph_scores); float64. */
  Model.prototype.scores = function (keep) {
    var n = this.n, R = this.rows.length, acc = new Float64Array(n), mark = new Uint8Array(n), touched = [];
    var F = this.blocks[0], E = this.blocks[1], size = F.values.length + E.values.length;
    var cols = new Int32Array(size), vals = new Float64Array(size), start = new Int32Array(R + 1);
    var errorFraction = new Float64Array(n), at = 0, k, j, e;
    for (var r = 0; r < R; r++) {
      var t = this.rows[r];
      start[r] = at;
      if (this.isFeature[t] && !keep[t]) { continue; }  // merged: its row is zero
      for (k = E.indptr[r]; k < E.indptr[r + 1]; k++) {
        e = E.indices[k];
        if (!mark[e]) { mark[e] = 1; touched.push(e); }
        acc[e] += E.values[k];
      }
      for (k = F.indptr[r]; k < F.indptr[r + 1]; k++) {
        var c = F.indices[k];
        if (this.isFeature[c] && !keep[c]) {
          e = this.errOf[c];
          if (!mark[e]) { mark[e] = 1; touched.push(e); }
          acc[e] += F.values[k];
        } else {
          cols[at] = c; vals[at++] = F.values[k];
        }
      }
      var first = at;
      for (j = 0; j < touched.length; j++) {
        e = touched[j];
        cols[at] = e; vals[at++] = acc[e]; acc[e] = 0; mark[e] = 0;
      }
      touched.length = 0;
      var sum = 0;
      for (j = start[r]; j < at; j++) { sum += Math.abs(vals[j]); }
      var denominator = Math.max(sum, 1e-10), fraction = 0;
      for (j = start[r]; j < at; j++) {
        vals[j] = Math.abs(vals[j]) / denominator;
        if (j >= first) { fraction += vals[j]; }
      }
      errorFraction[t] = fraction;
    }
    start[R] = at;
    var rows = this.rows;
    function step(v) {
      var next = new Float64Array(n), nonzero = false;
      for (var r = 0; r < R; r++) {
        var x = v[rows[r]];
        if (x === 0) { continue; }
        for (var j = start[r]; j < start[r + 1]; j++) { next[cols[j]] += x * vals[j]; }
      }
      for (var i = 0; i < n; i++) { if (next[i] !== 0) { nonzero = true; break; } }
      return nonzero ? next : null;
    }
    // influence = w·(Â + Â² + …), summed until the series ends (the graph is acyclic)
    var current = step(this.w), total = new Float64Array(n), i;
    for (var iteration = 0; current !== null; iteration++) {
      if (iteration > 10000) { throw new Error('influence did not converge: the graph has a cycle'); }
      for (i = 0; i < n; i++) { total[i] += current[i]; }
      current = step(current);
    }
    var tokens = 0, errors = 0, top = 0, bottom = 0;
    for (i = 0; i < n; i++) {
      if (this.isToken[i]) { tokens += total[i]; }
      if (this.isError[i]) { errors += total[i]; }
      var output = total[i] + this.w[i];
      top += (1 - errorFraction[i]) * output;
      bottom += output;
    }
    return [tokens / (tokens + errors), top / bottom];
  };

  CLT.decode = decode;
  CLT.Model = Model;
})();
