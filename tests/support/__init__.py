"""What the tests, the benchmarks and the chaos run share: etcd and agent processes
(``harness``, ``cluster``), PostgreSQL (``pg_harness``), network namespaces (``netns``,
``vip_lab``, ``etcd_lab``), PLC simulators (``plc_sim``), site records (``site_records``),
registries and node servers for the client library (``client_lab``) and the test
service (``svc``, run by path as a site's program)."""
