//! The policy's `[[network.http]]` rules in the plain form interception judges: one conversion
//! for the egress endpoint's handover and for `policy test`'s replay, so both judge the same rules.

use super::rules::Rule;
use crate::policy::http::HttpRule;

pub fn rules_of(rules: &[HttpRule]) -> Vec<Rule> {
    rules
        .iter()
        .map(|r| Rule {
            host: r.host().to_string(),
            port: r.port(),
            methods: r.methods().to_vec(),
            paths: r.paths().to_vec(),
            text: r.text().to_string(),
            line: r.line(),
        })
        .collect()
}
