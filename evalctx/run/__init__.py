"""The run: from a suite to rows on disk. :mod:`.sampling` expands a suite into sample specs and builds their
prompts; :mod:`.schedule` shards specs over replicas and batches them, :mod:`.prefix_order` orders a replica's
prompts so consecutive ones share prefixes; :mod:`.runner` drives the backend over them (resume, preflight,
journals; its :class:`~.runner.RunConfig` is the resolved run); :mod:`.rows` turns each result into a scored row;
:mod:`.closing` merges the journals and decides the run's status; :mod:`.environment` is what the manifest records
of the machine; :mod:`.dist` is the MPI world (ranks, replicas); :mod:`.interrupts`, :mod:`.progress` and
:mod:`.status` handle signals, the progress bar and exit codes."""
