//! End-to-end tests: the real `platform-service` binary on free ports, a throwaway
//! PostgreSQL, real Flight SQL clients. One test binary with modules, to link once.

mod auth;
mod bad_input;
mod bench;
mod cli;
mod clients;
mod config_errors;
mod distributed;
mod edge;
mod federation;
mod forwarding;
mod golden;
mod hostile;
mod injection;
mod key_lookup;
mod metrics;
mod parameterize;
mod postgres_tls;
mod results_cache;
mod scan_order;
mod sql_fuzz;
mod status;
mod tiers;
mod tls;
mod tpch;
mod tpch_plans;
mod tpch_tiers;
mod traces;
