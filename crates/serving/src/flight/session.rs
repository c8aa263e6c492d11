//! Flight session actions (`SetSessionOptions`, `GetSessionOptions`, `CloseSession`).
//!
//! arrow-flight 59 has no types for these messages, so the few we need are declared here
//! from Flight.proto. Strata keeps no per-session state (any replica serves any request),
//! so there are no settable options: every name is answered `INVALID_NAME`, and closing a
//! session always succeeds.

use std::collections::HashMap;

/// Action type names from Flight.proto.
pub const SET_SESSION_OPTIONS: &str = "SetSessionOptions";
pub const GET_SESSION_OPTIONS: &str = "GetSessionOptions";
pub const CLOSE_SESSION: &str = "CloseSession";

#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionOptionValue {
    #[prost(oneof = "session_option_value::OptionValue", tags = "1, 2, 3, 4, 5")]
    pub option_value: Option<session_option_value::OptionValue>,
}

pub mod session_option_value {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StringListValue {
        #[prost(string, repeated, tag = "1")]
        pub values: Vec<String>,
    }

    /// Variant names follow Flight.proto's field names.
    #[allow(clippy::enum_variant_names)]
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum OptionValue {
        #[prost(string, tag = "1")]
        StringValue(String),
        #[prost(bool, tag = "2")]
        BoolValue(bool),
        #[prost(sfixed64, tag = "3")]
        Int64Value(i64),
        #[prost(double, tag = "4")]
        DoubleValue(f64),
        #[prost(message, tag = "5")]
        StringListValue(StringListValue),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetSessionOptionsRequest {
    #[prost(map = "string, message", tag = "1")]
    pub session_options: HashMap<String, SessionOptionValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetSessionOptionsError {
    /// 0 unspecified, 1 invalid name, 2 invalid value, 3 error.
    #[prost(int32, tag = "1")]
    pub value: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetSessionOptionsResult {
    #[prost(map = "string, message", tag = "1")]
    pub errors: HashMap<String, SetSessionOptionsError>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetSessionOptionsResult {
    #[prost(map = "string, message", tag = "1")]
    pub session_options: HashMap<String, SessionOptionValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloseSessionResult {
    /// 0 unspecified, 1 closed, 2 closing, 3 not closeable.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

const INVALID_NAME: i32 = 1;
const CLOSED: i32 = 1;

/// Answers a session action, or `None` when `action` is not one.
pub fn answer(action: &str, body: &[u8]) -> Option<Result<Vec<u8>, tonic::Status>> {
    use prost::Message;
    match action {
        SET_SESSION_OPTIONS => Some(
            SetSessionOptionsRequest::decode(body)
                .map_err(|e| tonic::Status::invalid_argument(format!("invalid SetSessionOptionsRequest: {e}")))
                .map(|req| {
                    let errors = req
                        .session_options
                        .into_keys()
                        .map(|name| (name, SetSessionOptionsError { value: INVALID_NAME }))
                        .collect();
                    SetSessionOptionsResult { errors }.encode_to_vec()
                }),
        ),
        GET_SESSION_OPTIONS => Some(Ok(GetSessionOptionsResult::default().encode_to_vec())),
        CLOSE_SESSION => Some(Ok(CloseSessionResult { status: CLOSED }.encode_to_vec())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn unknown_options_are_reported_by_name() {
        let mut req = SetSessionOptionsRequest::default();
        req.session_options.insert(
            "catalog".into(),
            SessionOptionValue { option_value: Some(session_option_value::OptionValue::StringValue("x".into())) },
        );
        let out = answer(SET_SESSION_OPTIONS, &req.encode_to_vec()).expect("session action").expect("ok");
        let result = SetSessionOptionsResult::decode(out.as_slice()).expect("decode");
        assert_eq!(result.errors["catalog"].value, INVALID_NAME);
        let closed = answer(CLOSE_SESSION, &[]).expect("session action").expect("ok");
        assert_eq!(CloseSessionResult::decode(closed.as_slice()).expect("decode").status, CLOSED);
        assert!(answer("Other", &[]).is_none());
    }
}
