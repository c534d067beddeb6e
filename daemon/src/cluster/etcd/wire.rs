//! The JSON shapes of etcd's v3 gateway (the gRPC messages as
//! grpc-gateway marshals them): keys and values base64, int64 as strings,
//! fields at their default left out. Only the fields we use.

use serde::{Deserialize, Serialize};

/// Serde helpers for the gateway's encodings.
mod enc {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn ser_b64<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn de_b64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(de::Error::custom)
    }

    pub fn ser_i64<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    /// int64 comes as a string; accept a number too.
    pub fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            S(String),
            I(i64),
        }
        match N::deserialize(d)? {
            N::S(s) => s.parse().map_err(de::Error::custom),
            N::I(i) => Ok(i),
        }
    }

    pub fn is_zero(v: &i64) -> bool {
        *v == 0
    }
}

use enc::{de_b64, de_i64, is_zero, ser_b64, ser_i64};

#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct RangeRequest {
    #[serde(serialize_with = "ser_b64")]
    pub key: Vec<u8>,
    #[serde(serialize_with = "ser_b64", skip_serializing_if = "Vec::is_empty")]
    pub range_end: Vec<u8>,
    #[serde(serialize_with = "ser_i64", skip_serializing_if = "is_zero")]
    pub limit: i64,
    /// "ASCEND" / "DESCEND".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort_order: Option<&'static str>,
    /// "KEY" / "CREATE" / "MOD" / ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sort_target: Option<&'static str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keys_only: bool,
}

#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct PutRequest {
    #[serde(serialize_with = "ser_b64")]
    pub key: Vec<u8>,
    #[serde(serialize_with = "ser_b64")]
    pub value: Vec<u8>,
    #[serde(serialize_with = "ser_i64", skip_serializing_if = "is_zero")]
    pub lease: i64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct DeleteRangeRequest {
    #[serde(serialize_with = "ser_b64")]
    pub key: Vec<u8>,
    #[serde(serialize_with = "ser_b64", skip_serializing_if = "Vec::is_empty")]
    pub range_end: Vec<u8>,
}

/// One txn comparison; only the field that `target` names is sent.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Compare {
    #[serde(serialize_with = "ser_b64")]
    pub key: Vec<u8>,
    /// "CREATE" / "MOD" / "VERSION" / "VALUE" / "LEASE".
    pub target: &'static str,
    /// "EQUAL" / "GREATER" / "LESS" / "NOT_EQUAL".
    pub result: &'static str,
    #[serde(serialize_with = "ser_i64")]
    pub create_revision: i64,
}

impl Compare {
    /// True when `key` does not exist.
    pub(crate) fn absent(key: &[u8]) -> Self {
        Self {
            key: key.to_vec(),
            target: "CREATE",
            result: "EQUAL",
            create_revision: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RequestOp {
    RequestRange(RangeRequest),
    RequestPut(PutRequest),
}

#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Serialize)]
pub(crate) struct LeaseRequest {
    #[serde(
        rename = "TTL",
        serialize_with = "ser_i64",
        skip_serializing_if = "is_zero"
    )]
    pub ttl: i64,
    #[serde(
        rename = "ID",
        serialize_with = "ser_i64",
        skip_serializing_if = "is_zero"
    )]
    pub id: i64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct WatchCreateRequest {
    #[serde(serialize_with = "ser_b64")]
    pub key: Vec<u8>,
    #[serde(serialize_with = "ser_b64", skip_serializing_if = "Vec::is_empty")]
    pub range_end: Vec<u8>,
    #[serde(serialize_with = "ser_i64", skip_serializing_if = "is_zero")]
    pub start_revision: i64,
}

#[derive(Serialize)]
pub(crate) struct WatchRequest<'a> {
    pub create_request: &'a WatchCreateRequest,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct ResponseHeader {
    #[serde(deserialize_with = "de_i64")]
    pub revision: i64,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct KeyValue {
    #[serde(deserialize_with = "de_b64")]
    pub key: Vec<u8>,
    #[serde(deserialize_with = "de_i64")]
    pub create_revision: i64,
    #[serde(deserialize_with = "de_i64")]
    pub mod_revision: i64,
    #[serde(deserialize_with = "de_b64")]
    pub value: Vec<u8>,
    #[serde(deserialize_with = "de_i64")]
    pub lease: i64,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct RangeResponse {
    pub header: ResponseHeader,
    pub kvs: Vec<KeyValue>,
    #[serde(deserialize_with = "de_i64")]
    pub count: i64,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct PutResponse {
    pub header: ResponseHeader,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct DeleteRangeResponse {
    pub header: ResponseHeader,
    #[serde(deserialize_with = "de_i64")]
    pub deleted: i64,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct ResponseOp {
    pub response_range: Option<RangeResponse>,
    pub response_put: Option<PutResponse>,
    pub response_delete_range: Option<DeleteRangeResponse>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct TxnResponse {
    pub header: ResponseHeader,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct LeaseGrantResponse {
    #[serde(rename = "ID", deserialize_with = "de_i64")]
    pub id: i64,
    #[serde(rename = "TTL", deserialize_with = "de_i64")]
    pub ttl: i64,
    pub error: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct LeaseKeepAliveResponse {
    #[serde(rename = "TTL", deserialize_with = "de_i64")]
    pub ttl: i64,
}

/// A message of a gRPC stream as the gateway sends it.
#[derive(Debug, Deserialize)]
pub(crate) struct StreamEnvelope<T> {
    pub result: Option<T>,
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum EventType {
    #[default]
    #[serde(rename = "PUT")]
    Put,
    #[serde(rename = "DELETE")]
    Delete,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
    pub kv: KeyValue,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct WatchResponse {
    pub header: ResponseHeader,
    pub created: bool,
    pub canceled: bool,
    #[serde(deserialize_with = "de_i64")]
    pub compact_revision: i64,
    pub cancel_reason: String,
    pub events: Vec<Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_with_defaults_left_out_parse() {
        let r: TxnResponse = serde_json::from_str(
            r#"{"header":{"revision":"2"},"responses":[{"response_range":{"header":{"revision":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"2","version":"1","value":"YmFy"}],"count":"1"}}]}"#,
        )
        .unwrap();
        assert!(!r.succeeded);
        let kv = &r.responses[0].response_range.as_ref().unwrap().kvs[0];
        assert_eq!(
            (kv.key.as_slice(), kv.value.as_slice()),
            (&b"foo"[..], &b"bar"[..])
        );
        assert_eq!(kv.lease, 0);
        let w: StreamEnvelope<WatchResponse> = serde_json::from_str(
            r#"{"result":{"header":{"revision":"4"},"events":[{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"4"}}, {"kv":{"key":"Zm9v"}}]}}"#,
        )
        .unwrap();
        let w = w.result.unwrap();
        assert_eq!(w.events[0].kind, EventType::Delete);
        assert_eq!(w.events[1].kind, EventType::Put);
        assert_eq!(w.header.revision, 4);
    }

    #[test]
    fn requests_use_the_gateway_encoding() {
        let t = TxnRequest {
            compare: vec![Compare::absent(b"k")],
            success: vec![RequestOp::RequestPut(PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                lease: 7,
            })],
            failure: vec![],
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"compare":[{"key":"aw==","target":"CREATE","result":"EQUAL","create_revision":"0"}],"success":[{"request_put":{"key":"aw==","value":"dg==","lease":"7"}}],"failure":[]}"#
        );
    }
}
