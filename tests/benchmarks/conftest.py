# The benchmark scripts are run by hand (python tests/benchmarks/bench_*.py --url ...), never by pytest.
collect_ignore_glob = ["*.py"]
