//! `config`: the settings this proxy runs with, under upstream's names and in upstream's
//! value shapes. Built once at start: nothing in it changes while the proxy runs.

use serde_json::{json, Value};

use crate::config::RunArgs;

pub fn config(args: &RunArgs) -> Value {
    json!({
        "localNode": args.node_name,
    })
}
