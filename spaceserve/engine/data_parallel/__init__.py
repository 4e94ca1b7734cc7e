"""Data parallelism: several engine-core replicas behind one front (AsyncLLM), each a whole engine with its own KV
cache and encoder cache.

- router.py: which replica gets a request (least outstanding work, with affinity for the replica that already holds
  its images or prompt prefix); pure logic, no torch.
- dp_client.py: DPCoreClient, the CoreClient AsyncLLM talks to, holding one client per replica: routes requests,
  sends aborts and utility calls where they belong, merges the replicas' outputs, handles a replica that dies.
- ray_replica.py: the Ray backend (replicas as Ray actors in a placement group, reached over ZMQ on TCP).
"""
