import dagster as dg

# One partition per shard; keys are shard paths relative to the dataset root, without ".tar".
shards = dg.DynamicPartitionsDefinition(name="shards")
