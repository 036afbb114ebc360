"""`make bench`: every benchmark, ratios measured side by side in one run; results under
benchmarks/results/."""

import runpy
from pathlib import Path

from deepzero_oracle.bench import markdown, run

RESULTS = Path(__file__).parent / "results"


def main():
    print("== coordinate estimates: engine vs the per-coordinate loop (MNIST-5k CNN and MLP, batch 256)")
    report = run(out_dir=RESULTS)
    print(markdown(report["results"]))
    grpc_bench = Path(__file__).parent / "bench_grpc.py"
    if grpc_bench.exists():
        print("\n== gRPC black box over loopback")
        runpy.run_path(str(grpc_bench))["main"](["--json", str(RESULTS / "bench_grpc.json")])
    print(f"\nresults in {RESULTS}/")


if __name__ == "__main__":
    main()
