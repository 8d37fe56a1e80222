//! The messages a subscriber sends on its socket (spec/stream.md §1): `join` and `leave`.

use serde::Deserialize;

/// A subscriber's message.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ClientMessage {
    Join { data: JoinData },
    Leave { data: JoinData },
}

/// What a `join` or `leave` names: the subscription and its group (and item).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinData {
    pub subscription_id: String,
    pub stream_name: String,
    pub group_id: String,
    #[serde(default)]
    pub id: Option<String>,
}
