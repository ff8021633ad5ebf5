//! The delivery state and the keyset cursor of listings: leaves of the store contract, shared
//! by `store::api` (deliveries) and `store::review` (the review listing).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::domain::VoteKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    Pending,
    Waiting,
    Done,
    Dead,
}

impl DeliveryState {
    pub const ALL: [Self; 4] = [Self::Pending, Self::Waiting, Self::Done, Self::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Waiting => "waiting",
            Self::Done => "done",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Where a page of [`Store::list_deliveries_after`](super::Store::list_deliveries_after) ends: the sort key of its last row. Shown to
/// operators as an opaque token (`--after`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryCursor {
    pub updated_at: SystemTime,
    pub key: VoteKey,
}

impl DeliveryCursor {
    /// `<microseconds since the epoch>.<base64url of the key as a JSON array>`.
    pub fn encode(&self) -> String {
        use base64::Engine as _;
        let micros = self
            .updated_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let key = serde_json::json!([self.key.message_id, self.key.user_id, self.key.name]);
        format!(
            "{micros}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.to_string())
        )
    }

    /// Parses [`DeliveryCursor::encode`]'s output; `None` for anything else.
    pub fn decode(s: &str) -> Option<Self> {
        use base64::Engine as _;
        let (micros, key) = s.split_once('.')?;
        let micros: u64 = micros.parse().ok()?;
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(key)
            .ok()?;
        let (message_id, user_id, name): (String, String, String) =
            serde_json::from_slice(&key).ok()?;
        Some(Self {
            updated_at: SystemTime::UNIX_EPOCH + Duration::from_micros(micros),
            key: VoteKey {
                message_id,
                user_id,
                name,
            },
        })
    }
}
