//! OAuth accounts: `authorization: Bearer`, the `oauth-2025-04-20` beta merged into the
//! client's, and the configured system prompt first in every Messages request.

use super::{Outgoing, Processor};
use crate::anthropic;
use crate::secret::Secret;

pub const OAUTH_BETA: &str = "oauth-2025-04-20";

pub struct OAuth<'a> {
    pub token: &'a Secret,
    pub system_prompt: &'a str,
}

impl Processor for OAuth<'_> {
    fn prepare(&self, out: &mut Outgoing<'_>) -> Result<(), super::Unfit> {
        out.take_header("x-api-key");
        out.set_header("authorization", format!("Bearer {}", self.token.expose()));
        let betas = out.take_header("anthropic-beta");
        let betas = betas.iter().map(|v| std::str::from_utf8(v).unwrap_or(""));
        out.set_header("anthropic-beta", anthropic::merge_beta(betas, OAUTH_BETA));
        if matches!(
            out.path.as_str(),
            "/v1/messages" | "/v1/messages/count_tokens"
        ) && !out.body.is_empty()
        {
            out.splice =
                anthropic::system_splice(out.body, self.system_prompt).map_err(super::Unfit)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `out` as the OAuth processor with token `at-1` and prompt `P` leaves it.
    fn prepared(mut out: Outgoing<'_>) -> Outgoing<'_> {
        let token = Secret::new("at-1");
        OAuth {
            token: &token,
            system_prompt: "P",
        }
        .prepare(&mut out)
        .expect("ok");
        out
    }

    #[test]
    fn sets_bearer_beta_and_system_prompt() {
        let out = prepared(Outgoing {
            path: "/v1/messages".into(),
            headers: vec![
                ("anthropic-beta".into(), b"tools-1".to_vec()),
                ("x-custom".into(), b"1".to_vec()),
            ],
            body: br#"{"model":"m","system":"S"}"#,
            splice: None,
        });
        let header = |n: &str| {
            out.headers
                .iter()
                .filter(|(h, _)| h == n)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(header("authorization"), ["Bearer at-1"]);
        assert_eq!(header("anthropic-beta"), ["tools-1,oauth-2025-04-20"]);
        assert_eq!(header("x-custom"), ["1"]);
        assert!(header("x-api-key").is_empty());
        let sent = out
            .splice
            .as_ref()
            .expect("an edit")
            .pieces(out.body)
            .concat();
        let body: serde_json::Value = serde_json::from_slice(&sent).expect("json");
        assert_eq!(body["system"][0]["text"], "P");
        assert_eq!(body["system"][1]["text"], "S");
    }

    #[test]
    fn leaves_bodies_of_other_paths_alone() {
        let out = prepared(Outgoing {
            path: "/v1/models".into(),
            headers: vec![],
            body: b"",
            splice: None,
        });
        assert!(out.body.is_empty() && out.splice.is_none());
    }
}
