//! One module per subcommand.
pub mod telemetry;
