//! Errors on the downstream boundary: each variant knows its HTTP status and the Anthropic
//! error type, and renders the JSON body a client of the Anthropic API expects.

use std::fmt;

#[derive(Debug, Clone)]
pub enum ApiError {
    /// The request is malformed (bad JSON, wrong types). Downstream's fault. 400.
    BadRequest(String),
    /// An OpenAI request the converter refuses; `param` names the field. 400.
    Invalid {
        message: String,
        param: Option<String>,
    },
    /// No or wrong gateway key. 401.
    Unauthorized(String),
    /// A key that may not do this (status without an admin key). 403.
    Forbidden(String),
    /// No such route. 404.
    NotFound(String),
    /// A known path with the wrong method; `allow` lists the right ones. 405.
    MethodNotAllowed { allow: &'static str },
    /// The request could not be read as HTTP (too large, too slow, bad framing).
    Http { status: u16, message: String },
    /// No account can carry the request and none will recover by itself. 503.
    NoAccount(String),
    /// Every usable account is cooling down; one returns in `retry_after` seconds. 529.
    AllCoolingDown { retry_after: u64 },
    /// A gateway key's rate or concurrency limit: worth retrying after `retry_after`. 429.
    RateLimited { message: String, retry_after: u64 },
    /// A gateway key's token budget is spent until it resets (`retry_after`): no retry within
    /// seconds can help, so the answer says not to retry. 429.
    BudgetSpent {
        message: String,
        retry_after: Option<u64>,
    },
    /// The upstream could not be reached or broke before answering. 502.
    UpstreamUnreachable(String),
    /// The upstream did not answer within the configured timeout. 504.
    UpstreamTimeout(String),
    /// The upstream answered success with a body that is not what it claims (not JSON, not an
    /// event stream). 502.
    UpstreamGarbled(String),
    /// The upstream's TLS certificate is not trusted: no account would do better. 502.
    UpstreamUntrusted(String),
}

/// Each boundary's error, as the client sees it: the one place they become `ApiError`.
impl From<crate::upstream::UpstreamError> for ApiError {
    fn from(e: crate::upstream::UpstreamError) -> ApiError {
        use crate::upstream::UpstreamError as U;
        match e {
            U::Unsendable(m) => ApiError::BadRequest(m),
            U::Unreachable(m) => ApiError::UpstreamUnreachable(m),
            U::Timeout(m) => ApiError::UpstreamTimeout(m),
            U::Garbled(m) => ApiError::UpstreamGarbled(m),
            U::Untrusted(m) => ApiError::UpstreamUntrusted(m),
        }
    }
}

impl From<crate::accounts::QueueEnd> for ApiError {
    fn from(end: crate::accounts::QueueEnd) -> ApiError {
        use crate::accounts::QueueEnd as Q;
        let busy = |account: String, why: &str| ApiError::RateLimited {
            message: format!(
                "account {account} serves as many requests at once as it may, and {why}"
            ),
            retry_after: 1,
        };
        match end {
            Q::Full(account) => busy(account, "its queue is full"),
            Q::TimedOut(account) => {
                busy(account, "the request waited its queue_timeout for a slot")
            }
            Q::ClientLeft => ApiError::Http {
                status: 499,
                message: "the client left while its request waited for a slot".into(),
            },
        }
    }
}

impl From<crate::accounts::Unavailable> for ApiError {
    fn from(e: crate::accounts::Unavailable) -> ApiError {
        match e {
            crate::accounts::Unavailable::Resting { retry_after } => {
                ApiError::AllCoolingDown { retry_after }
            }
            crate::accounts::Unavailable::None(why) => ApiError::NoAccount(why),
            crate::accounts::Unavailable::Full(entry) => ApiError::RateLimited {
                message: format!(
                    "account {} ({}) is serving as many requests as it may at once, and its queue is full",
                    entry.id(),
                    entry.account.name
                ),
                retry_after: 1,
            },
        }
    }
}

impl From<crate::limits::Refusal> for ApiError {
    fn from(refusal: crate::limits::Refusal) -> ApiError {
        use crate::limits::Refusal as R;
        let limited = |message: String, retry_after: u64| ApiError::RateLimited {
            message,
            retry_after,
        };
        match refusal {
            R::Budget {
                message,
                retry_after,
            } => ApiError::BudgetSpent {
                message,
                retry_after,
            },
            R::Rate { rpm, retry_after } => limited(
                format!("this gateway key is limited to {rpm} requests per minute"),
                retry_after,
            ),
            R::Concurrency { max } => limited(
                format!("this gateway key is limited to {max} requests at once"),
                1,
            ),
            R::Model { model, allowed } => ApiError::Forbidden(format!(
                "this gateway key may not use model {model:?}; allowed: {}",
                allowed.join(", ")
            )),
            R::Unpriced { model } => ApiError::Forbidden(format!(
                "this gateway key has a USD budget, and model {model:?} has no price in the gateway's table: its cost could not be counted (an admin can add a pricing: row)"
            )),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) | ApiError::Invalid { .. } => 400,
            ApiError::Unauthorized(_) => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Http { status, .. } => *status,
            ApiError::NoAccount(_) => 503,
            ApiError::AllCoolingDown { .. } => 529,
            ApiError::RateLimited { .. } | ApiError::BudgetSpent { .. } => 429,
            ApiError::UpstreamUnreachable(_)
            | ApiError::UpstreamGarbled(_)
            | ApiError::UpstreamUntrusted(_) => 502,
            ApiError::UpstreamTimeout(_) => 504,
        }
    }

    /// The `error.type` of Anthropic's error object for this status.
    pub fn error_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// Seconds for a `retry-after` header, when the error has one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::AllCoolingDown { retry_after }
            | ApiError::RateLimited { retry_after, .. } => Some(*retry_after),
            ApiError::BudgetSpent { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether a retry cannot fix it (a wrong, expired or revoked key, a model the key may not
    /// use, a spent budget): sent as `x-should-retry: false`, which the official SDKs and
    /// Claude Code obey instead of retrying a 401 or 429 over and over.
    pub fn hopeless(&self) -> bool {
        matches!(
            self,
            ApiError::Unauthorized(_) | ApiError::Forbidden(_) | ApiError::BudgetSpent { .. }
        )
    }

    /// OpenAI's `{"error":{"message","type","param","code"}}`; a spent budget is OpenAI's own
    /// `insufficient_quota`.
    pub fn openai_body(&self) -> Vec<u8> {
        let param = match self {
            ApiError::Invalid { param, .. } => param.as_deref(),
            _ => None,
        };
        let mut body = crate::openai::response::error_body(
            self.status(),
            self.error_type(),
            &self.to_string(),
            param,
        );
        if let ApiError::BudgetSpent { .. } = self {
            body["error"]["type"] = "insufficient_quota".into();
            body["error"]["code"] = "insufficient_quota".into();
        }
        body.to_string().into_bytes()
    }

    /// `{"type":"error","error":{"type":…,"message":…}}`.
    pub fn anthropic_body(&self) -> Vec<u8> {
        anthropic_error_json(self.error_type(), &self.to_string()).into_bytes()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::BadRequest(m)
            | ApiError::Unauthorized(m)
            | ApiError::NotFound(m)
            | ApiError::Forbidden(m)
            | ApiError::NoAccount(m)
            | ApiError::Http { message: m, .. }
            | ApiError::Invalid { message: m, .. }
            | ApiError::RateLimited { message: m, .. }
            | ApiError::BudgetSpent { message: m, .. } => f.write_str(m),
            ApiError::AllCoolingDown { retry_after } => write!(
                f,
                "every upstream account is cooling down (rate limited or failing); the first returns in {retry_after}s"
            ),
            ApiError::MethodNotAllowed { allow } => {
                write!(f, "method not allowed on this path; use {allow}")
            }
            ApiError::UpstreamUnreachable(m) => write!(f, "upstream unreachable: {m}"),
            ApiError::UpstreamTimeout(m) => write!(f, "upstream timed out: {m}"),
            ApiError::UpstreamGarbled(m) => write!(f, "upstream answered garbage: {m}"),
            ApiError::UpstreamUntrusted(m) => {
                write!(f, "upstream TLS certificate is not trusted: {m}")
            }
        }
    }
}

/// Anthropic's error object, fields in Anthropic's order.
pub fn anthropic_error_json(error_type: &str, message: &str) -> String {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        r#type: &'static str,
        error: Detail<'a>,
    }
    #[derive(serde::Serialize)]
    struct Detail<'a> {
        r#type: &'a str,
        message: &'a str,
    }
    let body = Body {
        r#type: "error",
        error: Detail {
            r#type: error_type,
            message,
        },
    };
    // Serialising two strings cannot fail.
    serde_json::to_string(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_types_match_anthropic() {
        let cases = [
            (
                ApiError::BadRequest("x".into()),
                400,
                "invalid_request_error",
            ),
            (
                ApiError::Unauthorized("x".into()),
                401,
                "authentication_error",
            ),
            (ApiError::NotFound("x".into()), 404, "not_found_error"),
            (
                ApiError::MethodNotAllowed { allow: "POST" },
                405,
                "invalid_request_error",
            ),
            (
                ApiError::Http {
                    status: 413,
                    message: "x".into(),
                },
                413,
                "request_too_large",
            ),
            (ApiError::NoAccount("x".into()), 503, "api_error"),
            (ApiError::UpstreamUnreachable("x".into()), 502, "api_error"),
            (ApiError::UpstreamTimeout("x".into()), 504, "api_error"),
            (ApiError::UpstreamGarbled("x".into()), 502, "api_error"),
            (ApiError::UpstreamUntrusted("x".into()), 502, "api_error"),
        ];
        for (error, status, kind) in cases {
            assert_eq!(error.status(), status);
            let body: serde_json::Value =
                serde_json::from_slice(&error.anthropic_body()).expect("json");
            assert_eq!(body["type"], "error");
            assert_eq!(body["error"]["type"], kind);
        }
    }
}
