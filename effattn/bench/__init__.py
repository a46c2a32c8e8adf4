"""The benchmark engine: sweep specs, worker processes, meters, the results store, reports, plots."""
