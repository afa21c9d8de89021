"""The Dagster shell over the core: partitions, resources, assets, checks, sensors, jobs."""
