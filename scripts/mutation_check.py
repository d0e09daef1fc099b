"""Mutation check (issue #33, evidence 1): break the package on purpose, one
way at a time, and show that the tests fail for each breakage.

For each mutation the tree (``git ls-files`` plus untracked, not ignored files)
is copied into a scratch folder, its tests run there once as they are (the
baseline: they must pass), then the mutation (an exact string that must occur
exactly once in its file) is applied and the same tests run again (they must
fail). The scratch copy is what every process imports: a ``sitecustomize.py``
on ``PYTHONPATH`` drops the editable install's finder and puts the scratch
folder first on ``sys.path`` in the driver, its subprocesses and Ray's
workers, which is checked once before the mutations run.

    .venv/bin/python scripts/mutation_check.py                # all; writes the report
    .venv/bin/python scripts/mutation_check.py --only gradcache_rng_replay
    .venv/bin/python scripts/mutation_check.py --list

Exits non-zero when a baseline fails, a mutation survives, or the scratch
copy is not what Ray's workers import. The report goes to
``benchmarks/results/mutation_check.json`` (with ``--only``, only with ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # tests/conftest.py: SciFact at <repo>/../shared/data
REPORT = ROOT / "benchmarks" / "results" / "mutation_check.json"
PER_TEST_TIMEOUT_S = 600
ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_DEDUP_LOGS": "1",
    "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "raysys" / "torch_extensions"),
}


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One deliberate breakage: ``old`` (exactly once in ``file``) becomes ``new``."""

    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    gap: str = ""  # where no existing test can catch it: the test that would


_STORE_WRITE = "    resolve(emb_dir).join(name).write_parquet(table)"
_CHECK_QUERY = (
    '        check_compatible(EncodingContract.from_dict(manifest["contract"]), embedder.contract)'
)
_CHECK_EXACT = _CHECK_QUERY[4:]  # the same check in stages.exact_search_stage, one level out

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "m3_no_gather",
        "remove the M3 gather: in-batch negatives stay on each worker's own batch",
        "raysys/train/tasks/m3.py",
        "if lc.in_batch_negatives and lc.gather_negatives and _world_size() > 1:",
        "if False:  # mutation: never gather",
        ("tests/test_m3_gather.py",),
    ),
    Mutation(
        "llara_visibility_swapped",
        "swap EBAE/EBAR visibility: the earlier prompt is hidden from the later "
        "one's positions the wrong way round, so EBAR sees the EBAE prompt",
        "raysys/train/tasks/llara.py",
        "allowed[a:b, a2:b2] = False",
        "allowed[a2:b2, a:b] = False",
        (
            "tests/test_llara.py::test_layout_hides_the_ebae_prompt_from_the_ebar_prompt",
            "tests/test_llara.py::test_one_pass_equals_two",
            "tests/test_llara.py::test_the_ebar_prompt_cannot_see_the_ebae_prompt",
        ),
    ),
    Mutation(
        "gradcache_rng_replay",
        "drop the RNG replay in GradCache's second forward",
        "raysys/train/steps.py",
        "if self.replay_rng:",
        "if False:  # mutation: never replay",
        ("tests/test_grad_cache.py::test_grad_cache_is_exact_under_every_zero_stage",),
    ),
    Mutation(
        "sparse_sum_train",
        "make the sparse max a sum (training side: vocabulary vectors)",
        "raysys/representations/sparse.py",
        'reduce="amax"',
        'reduce="sum"',
        ("tests/test_representations.py::test_sparse_score_by_hand",),
    ),
    Mutation(
        "sparse_sum_index",
        "make the sparse max a sum (index/search side: a text's terms)",
        "raysys/representations/sparse.py",
        "np.maximum.at(best, inv, weights)",
        "np.add.at(best, inv, weights)",
        (
            "tests/test_representations.py::"
            "test_sparse_terms_take_the_max_over_occurrences_and_drop_zero_weights",
            "tests/test_representations.py::test_sparse_score_by_hand",
        ),
    ),
    Mutation(
        "query_contract_unchecked",
        "skip the contract check at query time (Searcher)",
        "raysys/search/retrieve.py",
        _CHECK_QUERY,
        "        pass  # mutation: no contract check",
        ("tests/test_index.py::test_contract_mismatch_is_refused",),
    ),
    Mutation(
        "exact_search_contract_unchecked",
        "skip the contract check of exact search (stages.exact_search_stage, used by mining)",
        "raysys/stages.py",
        _CHECK_EXACT,
        "    pass  # mutation: no contract check",
        ("tests/test_mine.py::test_exact_search_refuses_a_query_encoder_of_another_contract",),
    ),
    Mutation(
        "resume_reencodes_done",
        "make resume re-encode the finished shards (every shard is pending)",
        "raysys/index/encode.py",
        'pending = [s for s in prepared["shards"] if s["name"] not in done]',
        'pending = list(prepared["shards"])  # mutation: done shards again',
        ("tests/test_index.py::test_killed_encode_resumes_without_duplicates",),
    ),
    Mutation(
        "resume_reencodes_unrecorded",
        "make resume re-encode a finished shard that was written but not yet "
        "recorded in the manifest when the run was killed",
        "raysys/index/encode.py",
        '                old["done"].append(s["name"])',
        "                pass  # mutation: a whole, unrecorded shard is encoded again",
        (
            "tests/test_index.py::"
            "test_resume_records_a_written_unrecorded_shard_without_encoding_it",
        ),
    ),
    Mutation(
        "shard_write_in_place",
        "write an embedding shard non-atomically (straight at its final path)",
        "raysys/index/encode.py",
        _STORE_WRITE,
        "    import pyarrow.parquet as pq; pq.write_table(table, resolve(emb_dir).join(name).path)",
        ("tests/test_index.py::test_an_interrupted_shard_write_leaves_the_old_shard_or_none",),
    ),
    Mutation(
        "storage_write_in_place",
        "every local storage write in place (no side file and rename)",
        "raysys/storage.py",
        "        if self.is_remote:\n            write(self.path)\n            return",
        "        if True:  # mutation: in place\n            write(self.path)\n            return",
        (
            "tests/test_storage.py::test_local_paths",
            "tests/test_storage.py::test_an_interrupted_local_write_keeps_the_old_file_whole",
        ),
    ),
    Mutation(
        "gpu_check_off",
        "turn off the use_gpu check (require_gpus returns at once)",
        "raysys/runtime.py",
        '    if wait_s is None:\n        wait_s = float(os.environ.get("RAYSYS_GPU_WAIT_S", "0") or 0)',
        "    return 0.0  # mutation: no GPU check\n"
        '    if wait_s is None:\n        wait_s = float(os.environ.get("RAYSYS_GPU_WAIT_S", "0") or 0)',
        (
            "tests/test_claims_gpu_errors.py::test_gpu_wait_ends_in_the_error_after_that_long",
            "tests/test_gpu_paths.py::test_gpu_pool_on_a_cluster_without_gpus_fails_at_once",
            "tests/test_gpu_paths.py::test_index_use_gpu_without_a_gpu_fails_before_reading",
        ),
    ),
    Mutation(
        "worker_device_check_off",
        "a worker given a GPU that torch cannot see runs on its CPU",
        "raysys/runtime.py",
        "    if torch.cuda.is_available():\n        return\n    try:",
        "    if True:  # mutation: never refuse\n        return\n    try:",
        (
            "tests/test_gpu_paths.py::"
            "test_a_worker_given_a_gpu_that_torch_cannot_see_refuses_to_run_on_cpu",
        ),
    ),
    Mutation(
        "maxsim_padding_counts",
        "MaxSim lets a passage's padding tokens win",
        "raysys/representations/multivector.py",
        "sim = sim.masked_fill(~p.mask.bool()[None, :, None, :], torch.finfo(sim.dtype).min)",
        "sim = sim  # mutation: no passage mask",
        ("tests/test_representations.py::test_maxsim_by_hand",),
    ),
    Mutation(
        "false_negatives_unmasked",
        "known positives of a query stay in its negatives",
        "raysys/losses.py",
        "mask[torch.arange(bq), target] = False\n"
        "        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)",
        "mask[torch.arange(bq), target] = False\n"
        "        scores = scores  # mutation: no false-negative mask",
        (
            "tests/test_losses.py::test_false_negative_mask_removes_known_positives",
            "tests/test_losses.py::test_false_negative_mask_by_hand_on_a_tied_row",
        ),
    ),
)

SITECUSTOMIZE = '''"""Mutation check: import raysys from the scratch copy, never the editable install."""
import sys

_SCRATCH = {scratch!r}
sys.meta_path[:] = [
    f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
]
sys.path[:] = [_SCRATCH] + [p for p in sys.path if p != _SCRATCH]
'''

SHIM_PROBE = r"""
import json, os, subprocess, sys, tempfile
from pathlib import Path

import ray
import raysys


def where() -> str:
    import raysys

    return raysys.__file__


ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
out = {"driver": raysys.__file__}
out["subprocess"] = subprocess.run(
    [sys.executable, "-c", "import raysys; print(raysys.__file__)"],
    check=True, capture_output=True, text=True,
).stdout.strip()
out["ray_task"] = ray.get(ray.remote(where).remote())


@ray.remote
class Probe:
    def where(self) -> str:
        return where()


out["ray_actor"] = ray.get(Probe.remote().where.remote())
ray.shutdown()

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

folder = tempfile.mkdtemp()


def train_func(config: dict) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    Path(config["folder"], f"rank{rank}").write_text(where())


TorchTrainer(
    train_func,
    train_loop_config={"folder": folder},
    scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
    run_config=RunConfig(storage_path=folder, name="probe"),
).fit()
for r in (0, 1):
    out[f"train_worker_{r}"] = Path(folder, f"rank{r}").read_text()
print("PROBE", json.dumps(out))
"""


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def snapshot_tree(dest: Path) -> None:
    """Copy the working tree's tracked and untracked, not ignored files (deleted
    ones left out) to ``dest``: every mutation starts from this one copy, so
    edits made to the tree while the check runs do not reach it."""
    names = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in sorted({n for n in names if n and (ROOT / n).is_file()}):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)


class Scratch:
    """A scratch copy of the tree at ``<base>/main`` (``<base>/shared`` links
    to the real data), a ``sitecustomize`` shim and a private Ray temp dir."""

    def __init__(self, source: Path, label: str, keep: bool = False) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"raysys-mut-{label}-"))
        self.root = self.base / "main"
        self.shim = self.base / "shim"
        # Ray's socket paths must stay short: the temp dir lives directly in /tmp.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rmut", dir="/tmp"))
        self.keep = keep
        shutil.copytree(source, self.root, symlinks=True)
        (self.base / "shared").symlink_to(SHARED)
        self.shim.mkdir()
        (self.shim / "sitecustomize.py").write_text(SITECUSTOMIZE.format(scratch=str(self.root)))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
        env.update(ENV)
        env["PYTHONPATH"] = f"{self.shim}:{self.root}"
        env["RAY_TMPDIR"] = str(self.ray_tmp)  # no other agent's Ray cluster is joined
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated file is never read from a stale .pyc
        env["COLUMNS"] = "250"  # pytest's summary lines keep their assertion message
        return env

    def apply(self, m: Mutation) -> None:
        """Replace ``m.old`` (which must occur exactly once) by ``m.new``; fail loudly otherwise."""
        path = self.root / m.file
        src = path.read_text()
        n = src.count(m.old)
        if n != 1:
            raise SystemExit(f"{m.name}: {m.file} holds the string to mutate {n} times, not once")
        mutated = src.replace(m.old, m.new)
        compile(mutated, str(path), "exec")  # the breakage is a behaviour, not a SyntaxError
        path.write_text(mutated)

    def reap(self) -> None:
        """End what a run left behind: processes naming this scratch's Ray temp dir."""
        for pid in _pids_mentioning(str(self.ray_tmp)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.reap()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment names ``text`` (our own runs only)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                if text.encode() in (proc / part).read_bytes():
                    found.append(int(proc.name))
                    break
            except OSError:
                continue
    return found


def run_tests(scratch: Scratch, tests: tuple[str, ...]) -> dict[str, Any]:
    """pytest on ``tests`` in the scratch copy: rc, outcome, what failed first, seconds."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--timeout={PER_TEST_TIMEOUT_S}",
        "-rfE",
        *tests,
    ]
    log_path = scratch.base / f"pytest-{time.monotonic_ns()}.log"
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=scratch.root,
            env=scratch.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=PER_TEST_TIMEOUT_S * len(tests) + 300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    seconds = round(time.perf_counter() - t0, 1)
    scratch.reap()
    lines = log_path.read_text(errors="replace").splitlines()
    first_e = next((ln.strip() for ln in lines if ln.startswith("E ")), None)
    failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    summary = next((ln.strip("= ") for ln in reversed(lines) if ln.strip()), "")
    outcome = {0: "pass", 1: "fail"}.get(rc, f"error (pytest rc {rc})")
    return {
        "rc": rc,
        "outcome": outcome,
        "summary": summary,
        "failed": failed[:3],
        "first_error_line": first_e,
        "seconds": seconds,
        "log_tail": lines[-40:] if rc not in (0, 1) else None,
    }


def check_shim(source: Path, keep: bool = False) -> dict[str, Any]:
    """Which raysys a driver, a subprocess, a Ray task, a Ray actor and two
    Ray Train workers import in a scratch run: every one must be the scratch copy."""
    scratch = Scratch(source, "shim", keep)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", SHIM_PROBE],
            cwd=scratch.base,  # not the scratch root: the shim alone must find it
            env=scratch.env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
        if line is None:
            return {"ok": False, "error": (proc.stdout + proc.stderr)[-3000:]}
        found = json.loads(line[len("PROBE ") :])
        want = str(scratch.root / "raysys" / "__init__.py")
        return {
            "ok": all(v == want for v in found.values()),
            "imports": {k: v.replace(str(scratch.base), "<scratch>") for k, v in found.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
    finally:
        scratch.close()


def check_mutation(
    m: Mutation,
    source: Path,
    baselines: dict[tuple[str, ...], dict[str, Any]],
    keep: bool = False,
) -> dict[str, Any]:
    """Baseline on the unmutated scratch copy (once per set of tests: the
    unmutated tree is the same for every mutation), then the same tests mutated."""
    scratch = Scratch(source, m.name, keep)
    try:
        if m.tests in baselines:
            baseline = {**baselines[m.tests], "shared_with_an_earlier_mutation": True}
        else:
            print(f"[{m.name}] baseline: {' '.join(m.tests)}", flush=True)
            baseline = baselines[m.tests] = run_tests(scratch, m.tests)
        print(f"[{m.name}] baseline {baseline['outcome']} ({baseline['seconds']} s)", flush=True)
        scratch.apply(m)
        mutated = run_tests(scratch, m.tests)
        print(f"[{m.name}] mutated {mutated['outcome']} ({mutated['seconds']} s)", flush=True)
    finally:
        scratch.close()
    return {
        "name": m.name,
        "what": m.what,
        "file": m.file,
        "old": m.old,
        "new": m.new,
        "tests": list(m.tests),
        **({"gap": m.gap} if m.gap else {}),
        "baseline": baseline,
        "mutated": mutated,
        "baseline_ok": baseline["rc"] == 0,
        "caught": baseline["rc"] == 0 and mutated["rc"] == 1,
        "survived": baseline["rc"] == 0 and mutated["rc"] == 0,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the results, each with the first failure it caused."""
    out = [f"{'mutation':32} {'baseline':9} {'mutated':9} {'caught':6} {'seconds':>8}"]
    for r in rows:
        b, mu = r["baseline"], r["mutated"]
        secs = mu["seconds"] + (0 if b.get("shared_with_an_earlier_mutation") else b["seconds"])
        caught = "yes" if r["caught"] else "NO"
        out.append(
            f"{r['name']:32} {b['outcome'][:9]:9} {mu['outcome'][:9]:9} {caught:6} {secs:8.1f}"
        )
        if mu["failed"]:
            out.append(f"    {mu['failed'][0].split(' - ')[0]}")
        if mu["first_error_line"]:
            out.append(f"    {mu['first_error_line'][:150]}")
        if r.get("gap") and not r["caught"]:
            out.append(f"    gap: {r['gap']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the mutation check; 0 only when every baseline passes and every mutation is caught."""
    names = [m.name for m in MUTATIONS]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", choices=names, help="run this mutation (repeatable)")
    ap.add_argument("--out", type=Path, help=f"report file (default {REPORT.relative_to(ROOT)})")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies")
    ap.add_argument("--skip-shim-check", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32} {m.file}: {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    t0 = time.perf_counter()
    source = Path(tempfile.mkdtemp(prefix="raysys-mut-tree-"))
    try:
        return run(args, chosen, source, t0)
    finally:
        shutil.rmtree(source, ignore_errors=True)


def run(args: argparse.Namespace, chosen: list[Mutation], source: Path, t0: float) -> int:
    """Snapshot the tree into ``source``, check the shim, run ``chosen``, write the report."""
    head = _git("rev-parse", "HEAD").strip()
    dirty = [ln[3:] for ln in _git("status", "--porcelain", "--", "raysys", "tests").splitlines()]
    snapshot_tree(source)
    for m in chosen:  # before anything runs: every mutation applies to this tree
        src = (source / m.file).read_text()
        if src.count(m.old) != 1:
            raise SystemExit(
                f"{m.name}: {m.file} holds the string to mutate {src.count(m.old)} times"
            )
        compile(src.replace(m.old, m.new), m.file, "exec")
    out = args.out or (None if args.only else REPORT)
    report: dict[str, Any] = {
        "issue": "#33 evidence 1: deliberate breakages, each caught by the tests",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_head": head,
        "tree": "working tree (tracked + untracked, not ignored files)",
        "uncommitted_in_raysys_or_tests": dirty,
        "command": "python scripts/mutation_check.py"
        + "".join(f" --only {n}" for n in args.only or []),
        "pytest": f"-x -q -p no:cacheprovider --timeout={PER_TEST_TIMEOUT_S}",
    }
    ok = True
    if not args.skip_shim_check:
        print("checking that every process imports the scratch copy ...", flush=True)
        report["shim_check"] = check_shim(source, args.keep)
        print(json.dumps(report["shim_check"], indent=2), flush=True)
        ok = bool(report["shim_check"]["ok"])
    baselines: dict[tuple[str, ...], dict[str, Any]] = {}
    rows = [check_mutation(m, source, baselines, args.keep) for m in chosen] if ok else []
    report["mutations"] = rows
    report["caught"] = [r["name"] for r in rows if r["caught"]]
    report["survived"] = [r["name"] for r in rows if r["survived"]]
    report["baseline_failed"] = [r["name"] for r in rows if not r["baseline_ok"]]
    report["mutated_run_errored"] = [
        r["name"] for r in rows if r["baseline_ok"] and not (r["caught"] or r["survived"])
    ]
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    ok = ok and len(report["caught"]) == len(chosen)
    report["ok"] = ok
    print(table(rows))
    print(
        f"caught {len(report['caught'])}/{len(chosen)}; survived: {report['survived']}; "
        f"baseline failed: {report['baseline_failed']}; {report['total_seconds']} s"
    )
    if out is not None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _results import write_results

        write_results(out, report, "scripts/mutation_check.py")
        print(f"report: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
