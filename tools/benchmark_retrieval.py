"""Benchmark exact top-k retrieval: cir_jax gallery_topk vs NumPy vs faiss.

Measures evaluation throughput (queries/s) of exact maximum-inner-product
top-k over a random L2-normalised gallery, side by side in one run:

  jax    cir_jax.retrieval.gallery_topk (gallery sharded over the local
         devices, query blocks of --block-size x gallery blocks of
         --gallery-block-size, chunk-pruned exact top-k per block and a
         running merge, per-shard top_k + merge);
         compile time is measured separately from the run.
  numpy  blocked matmul + argpartition (+ a sort of the k survivors), the
         same block size, so memory stays O(block x G).
  faiss  faiss.IndexFlatIP (exact), if `faiss` is importable.

Each backend runs in a fresh subprocess (`--worker NAME`) so its peak RSS is
its own; all get the same --threads (BLAS/OpenMP env vars and
faiss.omp_set_num_threads; XLA's CPU pool uses all cores, which equals
--threads on the 2-core reference machine). With --rounds > 1 the backends
are alternated A/B/C, A/B/C... because timings on a shared host drift, and
the median per backend is reported. Top-k ids of every backend are compared
with jax's (row-wise exact agreement).

Usage (defaults: G=100k, d=512, Q=10k, k=50):
  python tools/benchmark_retrieval.py
  python tools/benchmark_retrieval.py --gallery 20000 --queries 2000 --rounds 3
  python tools/benchmark_retrieval.py --jax-devices 2   # gallery over 2 CPU devices
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ('jax', 'numpy', 'faiss')


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--gallery', type=int, default=100_000)
  parser.add_argument('--queries', type=int, default=10_000)
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--k', type=int, default=50)
  parser.add_argument('--block-size', type=int, default=1024)
  # The default is cir_jax.retrieval.GALLERY_BLOCK (not imported here: jax must be
  # imported only after the worker has set its XLA flags).
  parser.add_argument('--gallery-block-size', type=int, default=65536,
                      help='jax: gallery rows per score block (peak memory '
                           'block-size x this, not Q x G)')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--jax-devices', type=int, default=1,
                      help='fake CPU devices the gallery is sharded over')
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--backends', default=','.join(BACKENDS))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--worker', choices=BACKENDS, help=argparse.SUPPRESS)
  parser.add_argument('--ids-out', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# Worker side: runs in a subprocess whose thread env vars are already set.


def _rss_mb():
  """Current resident set size of this process in MiB (Linux /proc)."""
  with open('/proc/self/statm') as f:
    pages = int(f.read().split()[1])
  return pages * os.sysconf('SC_PAGE_SIZE') / 2**20


def _peak_rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def _make_data(args):
  """Seeded float32 unit vectors, built in chunks so RSS never spikes."""
  import numpy as np
  rng = np.random.default_rng(args.seed)

  def unit_rows(n):
    out = np.empty((n, args.dim), np.float32)
    for start in range(0, n, 8192):
      chunk = rng.standard_normal((min(8192, n - start), args.dim),
                                  dtype=np.float32)
      chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
      out[start:start + len(chunk)] = chunk
    return out

  return unit_rows(args.queries), unit_rows(args.gallery)


def _matmul_peak_gflops(matmul, n=2048, repeats=3):
  """Best observed GFLOP/s of an n^3 float32 matmul (the machine's ceiling)."""
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    matmul()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


def _run_jax(args, queries, gallery):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cir_jax import retrieval

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  t0 = time.perf_counter()
  g_sharded, g_valid = retrieval.shard_gallery(jnp.asarray(gallery), mesh)
  q_dev = jax.device_put(queries)
  jax.block_until_ready((g_sharded, g_valid, q_dev))
  transfer_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  compiled = retrieval.gallery_topk.lower(
      q_dev, g_sharded, args.k, mesh, block_size=args.block_size,
      gallery_valid=g_valid,
      gallery_block_size=args.gallery_block_size).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost

  rss_before = _rss_mb()
  t0 = time.perf_counter()
  _, ids = compiled(q_dev, g_sharded, gallery_valid=g_valid)
  ids = jax.block_until_ready(ids)
  search_s = time.perf_counter() - t0

  a = jnp.ones((2048, 2048), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  peak = _matmul_peak_gflops(lambda: mm(a).block_until_ready())
  return np.asarray(ids), dict(
      search_s=search_s, compile_s=compile_s, transfer_s=transfer_s,
      rss_before_mb=rss_before, xla_flops=cost.get('flops'),
      matmul_peak_gflops=peak, devices=len(jax.devices()))


def _run_numpy(args, queries, gallery):
  import tracemalloc
  import numpy as np

  def search():
    out = np.empty((len(queries), args.k), np.int64)
    gallery_t = gallery.T
    for start in range(0, len(queries), args.block_size):
      scores = queries[start:start + args.block_size] @ gallery_t
      np.negative(scores, out=scores)  # in place: no second block x G copy
      part = np.argpartition(scores, args.k - 1, axis=1)[:, :args.k]
      # Order the survivors by score, ties by lower id (cir_jax's rule; exact
      # ties straddling the k-th place are not resolved, none occur here).
      part.sort(axis=1)
      vals = np.take_along_axis(scores, part, axis=1)  # negated scores
      order = np.argsort(vals, axis=1, kind='stable')
      out[start:start + len(part)] = np.take_along_axis(part, order, axis=1)
    return out

  rss_before = _rss_mb()
  tracemalloc.start()
  t0 = time.perf_counter()
  ids = search()
  search_s = time.perf_counter() - t0
  _, traced_peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  a = np.ones((2048, 2048), np.float32)
  peak = _matmul_peak_gflops(lambda: a @ a)
  return ids, dict(search_s=search_s, rss_before_mb=rss_before,
                   tracemalloc_peak_mb=traced_peak / 2**20,
                   matmul_peak_gflops=peak)


def _run_faiss(args, queries, gallery):
  import faiss
  faiss.omp_set_num_threads(args.threads)
  t0 = time.perf_counter()
  index = faiss.IndexFlatIP(args.dim)
  index.add(gallery)
  build_s = time.perf_counter() - t0
  rss_before = _rss_mb()
  t0 = time.perf_counter()
  _, ids = index.search(queries, args.k)
  search_s = time.perf_counter() - t0
  return ids, dict(search_s=search_s, build_s=build_s,
                   rss_before_mb=rss_before, faiss_version=faiss.__version__)


def worker(args):
  import numpy as np
  queries, gallery = _make_data(args)
  ids, result = {'jax': _run_jax, 'numpy': _run_numpy,
                 'faiss': _run_faiss}[args.worker](args, queries, gallery)
  result['peak_rss_mb'] = _peak_rss_mb()
  result['queries_per_s'] = args.queries / result['search_s']
  result['gflops'] = (2.0 * args.queries * args.gallery * args.dim /
                      result['search_s'] / 1e9)
  np.save(args.ids_out, np.asarray(ids, np.int64))
  print('RESULT ' + json.dumps(result))


# ---------------------------------------------------------------------------
# Parent side.


def _available(backend):
  if backend != 'faiss':
    return True
  try:
    import faiss  # noqa: F401 (only whether it imports)
    return True
  except ImportError:
    return False


def _spawn(args, backend, ids_path):
  env = dict(os.environ)
  for var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
    env[var] = str(args.threads)
  env['PYTHONPATH'] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
  if args.jax_devices > 1:
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count='
                        f'{args.jax_devices}')
  cmd = [sys.executable, __file__, '--worker', backend, '--ids-out', ids_path,
         '--gallery', str(args.gallery), '--queries', str(args.queries),
         '--dim', str(args.dim), '--k', str(args.k),
         '--block-size', str(args.block_size), '--threads', str(args.threads),
         '--gallery-block-size', str(args.gallery_block_size),
         '--seed', str(args.seed)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{backend} worker failed (exit {proc.returncode}):\n'
                       f'{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return
  import numpy as np
  backends = [b for b in args.backends.split(',') if b]
  unknown = set(backends) - set(BACKENDS)
  if unknown:
    raise SystemExit(f'unknown backends {sorted(unknown)}; valid: {BACKENDS}')
  skipped = [b for b in backends if not _available(b)]
  backends = [b for b in backends if b not in skipped]
  print(f'exact top-{args.k}: G={args.gallery} d={args.dim} Q={args.queries} '
        f'block={args.block_size} threads={args.threads} '
        f'jax_devices={args.jax_devices} rounds={args.rounds}'
        + (f'  (skipped, not importable: {skipped})' if skipped else ''))
  results = {b: [] for b in backends}
  with tempfile.TemporaryDirectory() as tmp:
    for round_index in range(args.rounds):
      for backend in backends:  # alternate A/B/C each round
        res = _spawn(args, backend, f'{tmp}/{backend}.npy')
        results[backend].append(res)
        print(f'  round {round_index} {backend:6s} '
              f"{res['queries_per_s']:9.1f} q/s  search {res['search_s']:.2f}s",
              flush=True)
    ids = {b: np.load(f'{tmp}/{b}.npy') for b in backends}

  print(f"\n{'backend':8s} {'q/s (med)':>10s} {'search s':>9s} {'GFLOP/s':>8s} "
        f"{'%matmul':>8s} {'compile s':>9s} {'peak RSS MiB':>12s} "
        f"{'RSS before':>10s} {'ids==jax':>8s}")
  for backend in backends:
    runs = results[backend]
    med = lambda key: statistics.median(r[key] for r in runs)  # pylint: disable=cell-var-from-loop
    peak_mm = runs[-1].get('matmul_peak_gflops')
    frac = f"{100 * med('gflops') / peak_mm:7.0f}%" if peak_mm else f"{'-':>8s}"
    compile_s = (f"{med('compile_s'):9.2f}" if 'compile_s' in runs[-1]
                 else f"{'-':>9s}")
    agree = (f"{100 * np.mean(np.all(ids[backend] == ids['jax'], axis=1)):7.2f}%"
             if 'jax' in ids else f"{'-':>8s}")
    print(f"{backend:8s} {med('queries_per_s'):10.1f} {med('search_s'):9.2f} "
          f"{med('gflops'):8.1f} {frac} {compile_s} "
          f"{max(r['peak_rss_mb'] for r in runs):12.0f} "
          f"{med('rss_before_mb'):10.0f} {agree}")
  print('\n%matmul: achieved GFLOP/s (2 Q G d / search time) over the best '
        'GFLOP/s of a 2048^3 float32 matmul in the same backend and process.')
  print('peak RSS includes the float32 data (Q+G) x d and, for jax, its '
        'device copy of the gallery; RSS before = just before the search.')
  for backend in backends:
    extra = {k: v for k, v in results[backend][-1].items()
             if k in ('xla_flops', 'transfer_s', 'tracemalloc_peak_mb',
                      'build_s', 'faiss_version', 'devices')}
    if extra:
      print(f'{backend}: ' + ', '.join(
          f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}'
          for k, v in extra.items()))


if __name__ == '__main__':
  main()
