"""Batch jobs that outlive one Python call: a JSONL file of requests answered durably and resumably (`nanoengine batch`, `llm.run_batch`)."""
