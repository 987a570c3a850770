"""The SQL migrations, shipped inside the package so that `pgbridge migrate` finds them when installed."""
