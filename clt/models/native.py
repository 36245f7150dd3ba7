"""Native CPU kernels, compiled on first use with the machine's C compiler; each has a PyTorch
fallback that gives the same result, so nothing depends on a compiler being present.

`topk_rows`: the k largest entries of every row of z [N, L, F] (float32, rows contiguous),
returned in (layer, token) order. `torch.topk` copies each row into a vector of (value, index) pairs and
partially sorts it (~10 µs per row of 2,048); the kernel takes the maxima of 4k strided blocks
of the row in one vectorised pass, whose k-th largest bounds the row's k-th largest value from
below, and selects the top k (quickselect) among the few entries of the blocks that reach it.
NaN counts as the largest value, as in `torch.topk`; which of several equal values at the k-th
place is kept is unspecified, as there. `bag_sum` and `row_dots`: the embedding bags and row dot
products of the sparse decoder and its gradients. `feature_edges`: the feature columns of attribution
rows, each decoder row dotted with a batch of gradients in place. `abs_weighted_sum`: Σ_r w_r·|rows[r]| over
float32 rows or their upper halves (the influence that ranks features in `attribute`), in one
memory pass summed in float64, where torch would first copy |rows| and its bfloat16 → float32.

The shared library is built once per source, compiler and CPU into ``$CLT_CACHE_DIR`` (default
``~/.cache/clt``)/native; ``CLT_NATIVE=0`` turns the kernels off. They run on
`torch.get_num_threads()` OpenMP threads: built with -fopenmp, the library links libgomp.so.1,
which resolves to the one torch has loaded, so kernels and torch's ops share one thread pool (a
separate pool would compete with torch's spinning workers for the same cores).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID omp_get_thread_num()
#define THREADS omp_get_num_threads()
#else
#define THREAD_ID 0
#define THREADS 1
#endif

/* [lo, hi): this thread's share of `items` consecutive items */
#define SHARE(items) int64_t lo = (items) * THREAD_ID / THREADS, hi = (items) * (THREAD_ID + 1) / THREADS

/* selection key: NaN ranks as the largest value, as in torch.topk */
static inline float key_of(float x) { return isnan(x) ? INFINITY : x; }

/* Rearrange v[0..m) (and ix, when given) so that v[0..k) hold the k largest keys; returns the
   k-th largest (quickselect, Hoare partition, median-of-three pivot). */
static float select_top(float* v, int64_t* ix, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m - 1, target = k - 1;
    while (lo < hi) {
        float a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi];
        float pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (v[i] > pivot) i++;
            while (v[j] < pivot) j--;
            if (i <= j) {
                float tv = v[i]; v[i] = v[j]; v[j] = tv;
                if (ix) { int64_t ti = ix[i]; ix[i] = ix[j]; ix[j] = ti; }
                i++; j--;
            }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else break;
    }
    return v[target];
}

/* Rows r in [row_start, row_end) in layer-major order r = l * n + t, read from z[t, l, :] of
   z [n, layers, f]; the k kept (value, index) pairs of row r go to val/idx[r * k ...].
   The row is cut into nb = 4k strided blocks {q, q + nb, q + 2nb, ...}, whose maxima come from
   one vertical pass; the k-th largest block maximum is at most the row's k-th largest value, so
   the top k lie among the entries >= it, in the blocks whose maximum reaches it (~k blocks,
   ~1.2k entries): those are collected and the top k selected. */
int clt_topk_rows_f32(const float* z, int64_t n, int64_t layers, int64_t f, int64_t stride_t, int64_t stride_l,
                      int64_t k, int64_t row_start, int64_t row_end, float* val, int64_t* idx) {
    int64_t nb = 4 * k < f ? 4 * k : f;
    float* maxima = malloc(nb * sizeof(float));
    float* v = malloc(f * sizeof(float));
    float* keys = malloc(f * sizeof(float));
    int64_t* ix = malloc(f * sizeof(int64_t));
    if (!maxima || !v || !keys || !ix) { free(maxima); free(v); free(keys); free(ix); return 1; }
    for (int64_t r = row_start; r < row_end; r++) {
        int64_t l = r / n, t = r % n;
        const float* row = z + t * stride_t + l * stride_l;
        const float* key = row;
        int nan = 0;
#pragma omp simd reduction(|:nan)
        for (int64_t u = 0; u < f; u++) nan |= row[u] != row[u];
        if (nan) {  /* rare: select on keys where NaN is +inf */
            for (int64_t u = 0; u < f; u++) keys[u] = key_of(row[u]);
            key = keys;
        }
        for (int64_t q = 0; q < nb; q++) maxima[q] = key[q];
        for (int64_t c = nb; c < f; c += nb) {
            int64_t width = f - c < nb ? f - c : nb;
            const float* chunk = key + c;
#pragma omp simd
            for (int64_t q = 0; q < width; q++) maxima[q] = chunk[q] > maxima[q] ? chunk[q] : maxima[q];
        }
        for (int64_t q = 0; q < nb; q++) v[q] = maxima[q];
        float thr = select_top(v, NULL, nb, k);
        int64_t count = 0;
        for (int64_t q = 0; q < nb; q++) {
            if (!(maxima[q] >= thr)) continue;
            for (int64_t u = q; u < f; u += nb) {
                v[count] = key[u];
                ix[count] = u;
                count += key[u] >= thr;
            }
        }
        select_top(v, ix, count, k);
        float* out_v = val + r * k;
        int64_t* out_i = idx + r * k;
        for (int64_t q = 0; q < k; q++) { out_i[q] = ix[q]; out_v[q] = row[ix[q]]; }
    }
    free(maxima); free(v); free(keys); free(ix);
    return 0;
}

/* Embedding bags: out[b, :len] (+)= sum over k in [starts[b], starts[b+1]) of w[e] * table[idx[e], :len]
   with e = order[k] (or k), for bags b in [b0, b1). Rows are `*_stride` floats apart. */
void clt_bag_sum_f32(float* out, int64_t out_stride, const float* table, int64_t table_stride, int64_t len,
                     const int64_t* starts, int64_t b0, int64_t b1, const int64_t* order, const int64_t* idx,
                     const float* w, int accumulate) {
    for (int64_t b = b0; b < b1; b++) {
        float* o = out + b * out_stride;
        if (!accumulate)
            for (int64_t i = 0; i < len; i++) o[i] = 0.0f;
        for (int64_t k = starts[b]; k < starts[b + 1]; k++) {
            int64_t e = order ? order[k] : k;
            const float* row = table + idx[e] * table_stride;
            float we = w[e];
#pragma omp simd
            for (int64_t i = 0; i < len; i++) o[i] += we * row[i];
        }
    }
}

/* out[e] = <a[ia[e], :len], b[ib[e], :len]> for e in [e0, e1). */
void clt_row_dots_f32(float* out, const float* a, int64_t a_stride, const int64_t* ia, const float* b,
                      int64_t b_stride, const int64_t* ib, int64_t len, int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; e++) {
        const float* x = a + ia[e] * a_stride;
        const float* y = b + ib[e] * b_stride;
        float acc = 0.0f;
#pragma omp simd reduction(+:acc)
        for (int64_t i = 0; i < len; i++) acc += x[i] * y[i];
        out[e] = acc;
    }
}

/* out[c] += sum over rows r of w[r] * |x[r, c]| for c in [c0, c1), accumulated in double a block
   of columns at a time; rows are float32, or (upper) the upper 16 bits of float32 values as int16:
   bfloat16 rounded toward zero. */
#define ABS_BLOCK 1024
static void abs_weighted_sum(float* out, const void* rows, int64_t stride, const float* w, int64_t n_rows,
                             int64_t c0, int64_t c1, int upper) {
    double acc[ABS_BLOCK];
    for (int64_t b0 = c0; b0 < c1; b0 += ABS_BLOCK) {
        int64_t m = c1 - b0 < ABS_BLOCK ? c1 - b0 : ABS_BLOCK;
        for (int64_t i = 0; i < m; i++) acc[i] = out[b0 + i];
        for (int64_t r = 0; r < n_rows; r++) {
            double wr = w[r];
            if (upper) {
                const uint16_t* x = (const uint16_t*)rows + r * stride + b0;
#pragma omp simd
                for (int64_t i = 0; i < m; i++) {
                    union { uint32_t u; float f; } v;
                    v.u = (uint32_t)(x[i] & 0x7FFF) << 16;
                    acc[i] += wr * v.f;
                }
            } else {
                const float* x = (const float*)rows + r * stride + b0;
#pragma omp simd
                for (int64_t i = 0; i < m; i++) acc[i] += wr * fabsf(x[i]);
            }
        }
        for (int64_t i = 0; i < m; i++) out[b0 + i] = (float)acc[i];
    }
}

/* Feature edges of a batch of gradients g [nb, positions, len] (rows of len contiguous): for e in
   [e0, e1), b < nb: out[b, col[e]] += act[e] * <g[b, pos[e]], table[row[e]]>; four batch rows per
   pass over a table row. Each col[e] appears once, so threads never write the same entry. */
void clt_feature_edges_f32(float* out, int64_t out_stride, const float* g, int64_t g_stride_b, int64_t g_stride_p,
                           const float* table, int64_t table_stride, int64_t len, const int32_t* pos,
                           const int32_t* row, const int32_t* col, const float* act, int64_t nb, int64_t e0,
                           int64_t e1) {
    for (int64_t e = e0; e < e1; e++) {
        const float* t = table + row[e] * table_stride;
        const float* gp = g + pos[e] * g_stride_p;
        float* o = out + col[e];
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4) {
            const float* g0 = gp + b * g_stride_b;
            const float *g1 = g0 + g_stride_b, *g2 = g1 + g_stride_b, *g3 = g2 + g_stride_b;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+:a0, a1, a2, a3)
            for (int64_t i = 0; i < len; i++) {
                float ti = t[i];
                a0 += g0[i] * ti;
                a1 += g1[i] * ti;
                a2 += g2[i] * ti;
                a3 += g3[i] * ti;
            }
            o[b * out_stride] += act[e] * a0;
            o[(b + 1) * out_stride] += act[e] * a1;
            o[(b + 2) * out_stride] += act[e] * a2;
            o[(b + 3) * out_stride] += act[e] * a3;
        }
        for (; b < nb; b++) {
            const float* g0 = gp + b * g_stride_b;
            float a0 = 0.0f;
#pragma omp simd reduction(+:a0)
            for (int64_t i = 0; i < len; i++) a0 += g0[i] * t[i];
            o[b * out_stride] += act[e] * a0;
        }
    }
}

/* The kernels above over all their items on `threads` OpenMP threads: torch's own pool when the
   library links the libgomp that torch loaded (same soname), so no second set of threads spins. */
int clt_topk_rows_f32_all(const float* z, int64_t n, int64_t layers, int64_t f, int64_t stride_t,
                          int64_t stride_l, int64_t k, float* val, int64_t* idx, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        SHARE(n * layers);
        failed |= clt_topk_rows_f32(z, n, layers, f, stride_t, stride_l, k, lo, hi, val, idx);
    }
    return failed;
}

void clt_bag_sum_f32_all(float* out, int64_t out_stride, const float* table, int64_t table_stride, int64_t len,
                         const int64_t* starts, int64_t bags, const int64_t* order, const int64_t* idx,
                         const float* w, int accumulate, int threads) {
#pragma omp parallel num_threads(threads)
    {
        SHARE(bags);
        clt_bag_sum_f32(out, out_stride, table, table_stride, len, starts, lo, hi, order, idx, w, accumulate);
    }
}

void clt_abs_weighted_sum_all(float* out, const void* rows, int64_t stride, const float* w, int64_t n_rows,
                              int64_t width, int upper, int threads) {
#pragma omp parallel num_threads(threads)
    {
        SHARE(width);
        abs_weighted_sum(out, rows, stride, w, n_rows, lo, hi, upper);
    }
}

void clt_feature_edges_f32_all(float* out, int64_t out_stride, const float* g, int64_t g_stride_b,
                               int64_t g_stride_p, const float* table, int64_t table_stride, int64_t len,
                               const int32_t* pos, const int32_t* row, const int32_t* col, const float* act,
                               int64_t nb, int64_t n, int threads) {
#pragma omp parallel num_threads(threads)
    {
        SHARE(n);
        clt_feature_edges_f32(out, out_stride, g, g_stride_b, g_stride_p, table, table_stride, len, pos, row, col,
                              act, nb, lo, hi);
    }
}

void clt_row_dots_f32_all(float* out, const float* a, int64_t a_stride, const int64_t* ia, const float* b,
                          int64_t b_stride, const int64_t* ib, int64_t len, int64_t n, int threads) {
#pragma omp parallel num_threads(threads)
    {
        SHARE(n);
        clt_row_dots_f32(out, a, a_stride, ia, b, b_stride, ib, len, lo, hi);
    }
}
"""

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99")
_FALLBACK_FLAGS = (  # without OpenMP (one thread), then without -march=native
    ("-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC", "-std=c99"),
    ("-O3", "-fopenmp-simd", "-shared", "-fPIC", "-std=c99"),
)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$CLT_CACHE_DIR/native`` or ``~/.cache/clt/native``."""
    root = os.environ.get("CLT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "clt"
    )
    return Path(root) / "native"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "kernels.c", Path(tmp) / target.name
        source.write_text(_SOURCE)
        for flags in (_FLAGS, *_FALLBACK_FLAGS):
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", str(built), "-lm"], capture_output=True, text=True, timeout=120
            )
            if result.returncode == 0:
                os.replace(built, target)  # atomic: concurrent builders leave one complete file
                return
        raise OSError(f"{compiler} failed: {result.stderr.strip()[-500:]}")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (with one warning) when they cannot be."""
    if os.environ.get("CLT_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler (cc, gcc, clang or $CC) found: the native kernels fall back to torch")
        return None
    key = hashlib.sha256("\0".join([_SOURCE, compiler, " ".join(_FLAGS), _cpu_key()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"clt-kernels-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not build the native kernels (%s): they fall back to torch", err)
        return None
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.clt_topk_rows_f32_all.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, i32]
    lib.clt_topk_rows_f32_all.restype = i32
    lib.clt_bag_sum_f32_all.argtypes = [ptr, i64, ptr, i64, i64, ptr, i64, ptr, ptr, ptr, i32, i32]
    lib.clt_bag_sum_f32_all.restype = None
    lib.clt_row_dots_f32_all.argtypes = [ptr, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i32]
    lib.clt_row_dots_f32_all.restype = None
    lib.clt_abs_weighted_sum_all.argtypes = [ptr, ptr, i64, ptr, i64, i64, i32, i32]
    lib.clt_abs_weighted_sum_all.restype = None
    lib.clt_feature_edges_f32_all.argtypes = [ptr, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i32]
    lib.clt_feature_edges_f32_all.restype = None
    return lib


def _threads(items: int, per_thread: int) -> int:
    """Threads for `items` items of work: torch's count, at least `per_thread` items each."""
    return max(1, min(torch.get_num_threads(), items // per_thread))


def topk_rows(z: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """Values and indices [L, N, k] (unsorted within a row) of the k largest entries of each row
    z[t, l, :] of z [N, L, F] (rows contiguous, any token and layer strides); None where the kernel
    does not apply (not a float32 CPU tensor, 0 < k ≤ F, or no compiled library) and the caller
    should use `torch.topk`."""
    if z.device.type != "cpu" or z.dtype != torch.float32 or z.ndim != 3 or z.stride(2) != 1:
        return None
    n, num_layers, num_features = z.shape
    if not 0 < k <= num_features or z.requires_grad or (lib := library()) is None:
        return None
    values = torch.empty(num_layers, n, k, dtype=torch.float32)
    indices = torch.empty(num_layers, n, k, dtype=torch.int64)
    threads = _threads(n * num_layers, 64)
    shape = (n, num_layers, num_features, z.stride(0), z.stride(1), k)
    if lib.clt_topk_rows_f32_all(z.data_ptr(), *shape, values.data_ptr(), indices.data_ptr(), threads):
        raise MemoryError("the native TopK kernel could not allocate its row buffers")
    return values, indices


def _check_range(index: Tensor, size: int, name: str) -> None:
    """The kernels read memory at these indices: refuse any outside [0, size)."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise IndexError(f"{name} holds indices outside [0, {size})")


def _rows(t: Tensor) -> bool:
    """A float32 CPU matrix whose rows are contiguous (any row stride)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.ndim == 2 and t.stride(1) == 1


def _index(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.int64 and t.ndim == 1 and t.is_contiguous()


def bag_sum(
    out: Tensor,
    table: Tensor,
    starts: Tensor,
    idx: Tensor,
    weights: Tensor,
    order: Tensor | None = None,
    *,
    accumulate: bool = False,
) -> bool:
    """Embedding bags written into `out` [B, len] (any row stride): row b (+)= Σ over k in
    starts[b]:starts[b+1] of weights[e] · table[idx[e]], e = order[k] (or k). `starts` [B+1].
    Returns False, touching nothing, where the kernel does not apply (then use
    `torch.nn.functional.embedding_bag`)."""
    if not (_rows(out) and _rows(table) and _index(starts) and _index(idx)) or (lib := library()) is None:
        return False
    if weights.dtype != torch.float32 or not weights.is_contiguous() or (order is not None and not _index(order)):
        return False
    if out.shape[1] != table.shape[1] or starts.numel() != out.shape[0] + 1 or weights.numel() != idx.numel():
        raise ValueError(
            f"bag_sum: out {list(out.shape)}, table {list(table.shape)}, starts [{starts.numel()}], "
            f"idx [{idx.numel()}] and weights [{weights.numel()}] do not fit together"
        )
    _check_range(idx, table.shape[0], "idx")
    _check_range(starts, idx.numel() + 1, "starts")
    if order is not None:
        _check_range(order, idx.numel(), "order")
    bags = out.shape[0]
    args = (out.data_ptr(), out.stride(0), table.data_ptr(), table.stride(0), out.shape[1], starts.data_ptr(), bags)
    rest = (0 if order is None else order.data_ptr(), idx.data_ptr(), weights.data_ptr(), int(accumulate))
    lib.clt_bag_sum_f32_all(*args, *rest, _threads(bags, 16))
    return True


def row_dots(out: Tensor, a: Tensor, ia: Tensor, b: Tensor, ib: Tensor) -> bool:
    """out[e] = ⟨a[ia[e]], b[ib[e]]⟩ for the rows of two matrices (any row strides), into the
    contiguous float32 vector `out`; False, touching nothing, where the kernel does not apply."""
    if not (_rows(a) and _rows(b) and _index(ia) and _index(ib)) or (lib := library()) is None:
        return False
    if out.dtype != torch.float32 or not out.is_contiguous() or a.shape[1] != b.shape[1]:
        return False
    if not ia.numel() == ib.numel() == out.numel():
        raise ValueError(f"row_dots: out [{out.numel()}], ia [{ia.numel()}] and ib [{ib.numel()}] differ in length")
    _check_range(ia, a.shape[0], "ia")
    _check_range(ib, b.shape[0], "ib")
    args = (out.data_ptr(), a.data_ptr(), a.stride(0), ia.data_ptr(), b.data_ptr(), b.stride(0), ib.data_ptr())
    lib.clt_row_dots_f32_all(*args, a.shape[1], out.numel(), _threads(out.numel(), 1024))
    return True


def feature_edges(
    out: Tensor, g: Tensor, table: Tensor, positions: Tensor, rows: Tensor, cols: Tensor, activations: Tensor
) -> bool:
    """out[b, cols[e]] += activations[e] · ⟨g[b, positions[e]], table[rows[e]]⟩ for every entry e and
    batch row b of g [B, n, d] (float32, d contiguous; out [B, ≥ max col + 1], rows contiguous):
    the feature edges of a batch of gradients, reading each decoder row of `table` [T, d] in place
    (no gathered copy). `cols` must not repeat. Index arrays are int32. Returns False, touching
    nothing, where the kernel does not apply (then use torch)."""
    if g.ndim != 3 or g.stride(2) != 1 or not _rows(out) or not _rows(table) or (lib := library()) is None:
        return False
    if g.dtype != torch.float32 or activations.dtype != torch.float32 or not activations.is_contiguous():
        return False
    if any(t.dtype != torch.int32 or not t.is_contiguous() or t.ndim != 1 for t in (positions, rows, cols)):
        return False
    n = len(positions)
    if not (len(rows) == len(cols) == len(activations) == n) or g.shape[2] != table.shape[1] or len(out) < len(g):
        raise ValueError(
            f"feature_edges: out {list(out.shape)}, g {list(g.shape)}, table {list(table.shape)} and entries "
            f"{[len(t) for t in (positions, rows, cols, activations)]} do not fit together"
        )
    _check_range(positions, g.shape[1], "positions")
    _check_range(rows, table.shape[0], "rows")
    _check_range(cols, out.shape[1], "cols")
    args = (out.data_ptr(), out.stride(0), g.data_ptr(), g.stride(0), g.stride(1), table.data_ptr(), table.stride(0))
    entries = (positions.data_ptr(), rows.data_ptr(), cols.data_ptr(), activations.data_ptr())
    lib.clt_feature_edges_f32_all(*args, g.shape[2], *entries, len(g), n, _threads(n, 256))
    return True


def abs_weighted_sum(out: Tensor, rows: Tensor, weights: Tensor) -> bool:
    """out[c] += Σ_r weights[r] · |rows[r, c]| for the columns c of `out` [width] (the first width
    columns of `rows` [R, ≥ width], rows contiguous, any row stride), summed in float64. `rows` is
    float32, or int16 holding the upper 16 bits of float32 values (bfloat16 rounded toward zero).
    Returns False, touching nothing, where the kernel does not apply (then sum with torch)."""
    if rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.int16) or rows.ndim != 2:
        return False
    if rows.stride(1) != 1 or out.dtype != torch.float32 or not out.is_contiguous() or (lib := library()) is None:
        return False
    if weights.dtype != torch.float32 or not weights.is_contiguous():
        return False
    if out.ndim != 1 or len(out) > rows.shape[1] or weights.shape != (rows.shape[0],):
        raise ValueError(
            f"abs_weighted_sum: out {list(out.shape)}, rows {list(rows.shape)} and weights {list(weights.shape)} "
            "do not fit together"
        )
    upper = int(rows.dtype == torch.int16)
    lib.clt_abs_weighted_sum_all(
        out.data_ptr(),
        rows.data_ptr(),
        rows.stride(0),
        weights.data_ptr(),
        rows.shape[0],
        len(out),
        upper,
        _threads(len(out), 4096),
    )
    return True


__all__ = ["abs_weighted_sum", "bag_sum", "feature_edges", "cache_dir", "library", "row_dots", "topk_rows"]
