//! `GET /api/feedback/schema`: the label schema of each accepted name, so that a UI knows which
//! control to draw (a toggle, a range, options, a text box) and which name carries the reasons
//! of a thumbs-down.

use http::{HeaderMap, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::Feedback;
use super::input::MAX_BATCH_VOTES;
use crate::body::{Body, json_response};
use crate::error::Error;

impl Feedback {
    /// `GET /api/feedback/schema`: `{"defaultName", "reasonName", "maxBatchVotes", "names":
    /// {NAME: {"name", "kind", "title", …kind's fields}}}`. Needs an identity like every
    /// feedback route.
    pub(super) fn schema(&self, headers: &HeaderMap) -> Result<Response<Body>, Error> {
        self.user(headers)?;
        let names: Map<String, Value> = self
            .config
            .names
            .iter()
            .map(|(name, schema)| (name.clone(), schema.to_json(name)))
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "defaultName": self.config.default_name,
                "reasonName": self.config.reason_name,
                "maxBatchVotes": MAX_BATCH_VOTES,
                "names": names,
            }),
        ))
    }
}
