"""The run: from a suite to rows on disk. :mod:`.sampling` expands a suite into sample specs and builds their
prompts; :mod:`.prefix_order` orders a replica's prompts so consecutive ones share prefixes; :mod:`.runner` drives
the backend over them (resume, preflight, journals, the closing summary and exit status); :mod:`.dist` is the MPI
world (ranks, replicas); :mod:`.interrupts`, :mod:`.progress` and :mod:`.status` handle signals, the progress bar
and exit codes."""
