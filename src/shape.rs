//! Shaping a request for the upstream: the checks of its body's framing and model, and the
//! conversion of an OpenAI body (Chat Completions, Responses) into the Anthropic request to
//! send, with the shape its answer must take.

use crate::error::ApiError;
use crate::gateway::Gateway;
use crate::http::Request;
use crate::openai::{self, Format};
use crate::relay::Shape;
use crate::route::Route;
use crate::router::body_format;

/// The longest model name accepted: real ones are a few dozen bytes, and the name is kept in
/// the ledger, the metrics' labels and the dashboard.
pub(crate) const MAX_MODEL_NAME: usize = 256;

/// A compressed request body is refused (415): the gateway reads and converts bodies, and
/// decoding one would need a decompressor with its own bounds. Clients fall back to plain
/// JSON (Codex sends plain JSON to custom providers).
pub(crate) fn check_encoding(req: &Request) -> Result<(), ApiError> {
    match req.header("content-encoding").map(str::trim) {
        None | Some("") => Ok(()),
        Some(e) if e.eq_ignore_ascii_case("identity") => Ok(()),
        Some(e) => Err(ApiError::Http {
            status: 415,
            message: format!(
                "request bodies must not be compressed (content-encoding: {}): send plain JSON",
                e.chars().take(40).collect::<String>()
            ),
        }),
    }
}

/// Decides what goes upstream and what shape the answer takes. A body that clearly belongs
/// to the other API than its path is served as what it is (an OpenAI body posted to
/// /v1/messages is converted and answered in OpenAI's format, and the reverse), rather than
/// failing upstream with a confusing 400. Returns the request to send when it differs from
/// the client's.
pub(crate) fn shape_request(
    gw: &Gateway,
    req: &Request,
    route: Route,
    format: &mut Format,
) -> Result<(Option<Request>, Shape), ApiError> {
    match route {
        Route::Models if *format == Format::OpenAI => {
            // OpenAI clients expect every model, not Anthropic's first page of 20. An alias the
            // list shows is retrievable too: its target is asked for and named as the alias.
            let id = req.path().strip_prefix("/v1/models/");
            let live = gw.live();
            let (target, alias) = match id {
                None => ("/v1/models?limit=1000".to_string(), None),
                Some(id) => match live.models.aliases.get(id) {
                    Some(to) => (format!("/v1/models/{to}"), Some(id.to_string())),
                    None => (req.path().to_string(), None),
                },
            };
            let aliases = live.models.aliases.keys().cloned().collect();
            Ok((
                Some(derived(req, &target, req.body.clone())),
                Shape::Models { aliases, alias },
            ))
        }
        Route::Models => Ok((None, Shape::Anthropic)),
        Route::Messages { count_tokens } => {
            if count_tokens || body_format(&req.body)? != Some(Format::OpenAI) {
                return Ok((None, Shape::Anthropic));
            }
            *format = Format::OpenAI;
            convert(gw, req)
        }
        Route::Chat => {
            if body_format(&req.body)? == Some(Format::Anthropic) {
                *format = Format::Anthropic;
                return Ok((
                    Some(derived(req, "/v1/messages", req.body.clone())),
                    Shape::Anthropic,
                ));
            }
            convert(gw, req)
        }
        Route::Responses => {
            let live = gw.live();
            let options = openai::request::Options {
                default_max_tokens: live.models.default_max_tokens,
                aliases: &live.models.aliases,
            };
            let converted =
                openai::responses::request::convert(&req.body, &options).map_err(|e| {
                    ApiError::Invalid {
                        message: e.message,
                        param: e.param,
                    }
                })?;
            let reply = openai::responses::Reply {
                model: converted.requested_model,
                custom_tools: converted.custom_tools,
                session: converted.session,
            };
            Ok((
                Some(derived(req, "/v1/messages", converted.body)),
                Shape::Responses(Box::new(reply)),
            ))
        }
        _ => Err(ApiError::NotFound("no route".into())),
    }
}

/// An OpenAI Chat Completions request as the Anthropic request to send.
fn convert(gw: &Gateway, req: &Request) -> Result<(Option<Request>, Shape), ApiError> {
    let live = gw.live();
    let options = openai::request::Options {
        default_max_tokens: live.models.default_max_tokens,
        aliases: &live.models.aliases,
    };
    let converted =
        openai::request::convert(&req.body, &options).map_err(|e| ApiError::Invalid {
            message: e.message,
            param: e.param,
        })?;
    let shape = Shape::Chat {
        include_usage: converted.include_usage,
        model: converted.requested_model,
    };
    Ok((Some(derived(req, "/v1/messages", converted.body)), shape))
}

/// The client's request with another target and body (headers and framing kept).
fn derived(req: &Request, target: &str, body: Vec<u8>) -> Request {
    Request {
        method: req.method.clone(),
        target: target.to_string(),
        minor_version: req.minor_version,
        headers: req.headers.clone(),
        body,
        keep_alive: req.keep_alive,
    }
}
