"""`make bench`: every benchmark, ratios measured side by side in one run.

    python benchmarks/run.py [--out DIR]      # default runs/bench (never the committed docs)
"""

import argparse
import runpy
from pathlib import Path

from deepzero_oracle.apps.bench import markdown, markdown_sparse, run, run_sparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench", help="folder for the JSON and markdown results")
    args = parser.parse_args(argv)
    out = Path(args.out)
    print("== coordinate estimates: engine vs the per-coordinate loop (MNIST-5k CNN and MLP, batch 256)")
    report = run(out_dir=out)
    print(markdown(report["results"]))
    print("\n== ResNet-20, one 90%-sparse CGE step: engine vs the loop vs the released cge (batch 128, 256)")
    sparse = run_sparse("resnet20", [128, 256], out_dir=out, engine_coords=24, loop_coords=1, released_coords=6)
    print(markdown_sparse(sparse["results"]))
    print("\n== gRPC black box over loopback")
    runpy.run_path(str(Path(__file__).parent / "bench_grpc.py"))["main"](["--json", str(out / "bench_grpc.json")])
    print("\n== scale-out: a CGE step on a CPU-bound black box, 1 vs 2 Dask workers")
    runpy.run_path(str(Path(__file__).parent / "bench_scaleout.py"))["main"](
        ["--json", str(out / "bench_scaleout.json")])
    print("\n== replicas: ZO-SOL burgers (small) against serve --workers 1 vs --workers 2")
    runpy.run_path(str(Path(__file__).parent / "bench_replicas.py"))["main"](
        ["--json", str(out / "bench_replicas.json")])
    print("\n== serving beside MLServer: tritonclient against `deepzero-oracle serve` and MLServer 1.7.1")
    runpy.run_path(str(Path(__file__).parent / "bench_serving.py"))["main"](
        ["--json", str(out / "bench_serving.json")])
    print("\n== CSV logs: time to append one row at 1k, 10k, 100k rows (flat: the header lives in memory)")
    runpy.run_path(str(Path(__file__).parent / "bench_csvlog.py"))["main"](["--json", str(out / "bench_csvlog.json")])
    print("\n== quality per query: ZO estimators vs CMA-ES and NGOpt at equal query budgets, 5 seeds "
          "(records kept in OUT/queries: a rerun continues)")
    from deepzero_oracle.apps.queries import bench_queries, markdown as markdown_queries

    print(markdown_queries(bench_queries(out)))
    print(f"\nresults in {out}/")


if __name__ == "__main__":
    main()
