//! Our HTTP for downloads from the Hub (revision info and `resolve`), held
//! to the rules a hostile or broken server cannot bend:
//!
//! - redirects are followed by hand, at most ten, and the token goes only
//!   to the endpoint's own origin (scheme, host and port), decided on the
//!   URL as parsed (WHATWG rules, so `/\host/` is another host), on every hop;
//! - connect and read timeouts (HF_HUB_ETAG_TIMEOUT and
//!   HF_HUB_DOWNLOAD_TIMEOUT, seconds, 10 each as in huggingface_hub);
//! - JSON answers and error texts are read up to a cap;
//! - no retries: every failure is reported at once, with what to do;
//! - text from the server is stripped of the token and of control
//!   characters before it reaches the user.

use std::io::Read;
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, LOCATION};
use reqwest::Url;

use super::endpoint;
use crate::error::{Error, Result};

const MAX_REDIRECTS: usize = 10;
/// The largest JSON answer read (a repository listing of ~100k files is
/// a few MB).
pub(super) const MAX_JSON: u64 = 16 << 20;
/// The most of an error answer shown.
const MAX_ERROR_TEXT: u64 = 4096;

fn seconds(var: &str, default: f64) -> Duration {
    let s = std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e6)
        .unwrap_or(default);
    Duration::from_secs_f64(s)
}

/// An I/O error met while reading a body, in words.
pub(super) fn describe_io(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::TimedOut || e.to_string().contains("timed out") {
        format!(
            "the server went silent for {} s (set HF_HUB_DOWNLOAD_TIMEOUT to wait longer)",
            seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0).as_secs_f64()
        )
    } else {
        e.to_string()
    }
}

/// Server text made safe to show: no token, no control characters (no
/// terminal escapes, no forged lines), at most 300 characters.
pub(super) fn clean(s: &str, token: Option<&str>) -> String {
    let s = match token {
        Some(t) if !t.is_empty() => s.replace(t, "[token]"),
        _ => s.to_string(),
    };
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    if s.chars().count() > 300 {
        out.push('…');
    }
    out.trim().to_string()
}

/// An answer and the headers of the last answer that came from the
/// endpoint's origin (where the Hub puts X-Repo-Commit, ETag, X-Linked-*).
pub(super) struct Fetched {
    pub resp: Response,
    pub hub: HeaderMap,
}

pub(super) struct Http {
    client: Client,
    endpoint: Url,
    token: Option<String>,
}

impl Http {
    pub(super) fn new(token: Option<String>) -> Result<Http> {
        let ep = endpoint();
        let endpoint = Url::parse(&ep)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "HF_ENDPOINT {ep:?} is not an http(s) URL (e.g. https://huggingface.co)"
                ))
            })?;
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(seconds("HF_HUB_ETAG_TIMEOUT", 10.0))
            .timeout(seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0))
            .user_agent(format!(
                "{}/{}",
                env!("CARGO_PKG_NAME"),
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| Error::Internal(format!("cannot set up HTTP: {e}")))?;
        Ok(Http {
            client,
            endpoint,
            token,
        })
    }

    /// The endpoint followed by `segments`, each percent-encoded whole (so
    /// a `/` inside a revision stays inside it).
    pub(super) fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.endpoint.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty();
            p.extend(segments);
        }
        u
    }

    pub(super) fn clean(&self, s: &str) -> String {
        clean(s, self.token.as_deref())
    }

    fn same_origin(&self, u: &Url) -> bool {
        u.origin() == self.endpoint.origin()
    }

    fn send_error(&self, e: reqwest::Error, at: &str) -> Error {
        let origin = self.endpoint.origin().ascii_serialization();
        if e.is_timeout() {
            Error::Network(format!(
                "{at}: no answer from {origin} within {} s (set HF_HUB_DOWNLOAD_TIMEOUT, or \
                 HF_HUB_ETAG_TIMEOUT for connecting, to wait longer)",
                seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0).as_secs_f64()
            ))
        } else if e.is_connect() {
            Error::Network(format!(
                "{at}: cannot connect to {origin} (check HF_ENDPOINT and the network, or set \
                 HF_HUB_OFFLINE=1 to use the cache only)"
            ))
        } else {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            Error::Network(format!("{at}: {}", self.clean(&msg)))
        }
    }

    /// GET `url`, following redirects by hand. Errors name `at`.
    pub(super) fn get(&self, url: Url, at: &str) -> Result<Fetched> {
        let mut url = url;
        let mut hub = HeaderMap::new();
        for _ in 0..=MAX_REDIRECTS {
            let same = self.same_origin(&url);
            let mut req = self.client.get(url.clone());
            if same {
                if let Some(t) = &self.token {
                    req = req.bearer_auth(t);
                }
            }
            let resp = req.send().map_err(|e| self.send_error(e, at))?;
            if same {
                hub = resp.headers().clone();
            }
            if !resp.status().is_redirection() {
                return Ok(Fetched { resp, hub });
            }
            let next = resp
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .filter(|u| matches!(u.scheme(), "http" | "https"));
            url = next.ok_or_else(|| {
                Error::Network(format!(
                    "{at}: the server redirected ({}) to no usable http(s) location",
                    resp.status().as_u16()
                ))
            })?;
        }
        Err(Error::Network(format!(
            "{at}: more than {MAX_REDIRECTS} redirects; stopped"
        )))
    }

    /// The body of `resp`, at most `cap` bytes.
    pub(super) fn read_capped(&self, resp: Response, cap: u64, at: &str) -> Result<Vec<u8>> {
        if resp.content_length().is_some_and(|n| n > cap) {
            return Err(Error::Network(format!(
                "{at}: the server announced an answer of {} bytes, over the {cap}-byte limit; \
                 not read",
                resp.content_length().unwrap_or(0)
            )));
        }
        let mut v = Vec::new();
        resp.take(cap + 1)
            .read_to_end(&mut v)
            .map_err(|e| Error::Network(format!("{at}: {}", describe_io(&e))))?;
        if v.len() as u64 > cap {
            return Err(Error::Network(format!(
                "{at}: the server's answer runs past the {cap}-byte limit; stopped reading"
            )));
        }
        Ok(v)
    }

    /// GET `url` and parse its JSON body (at most MAX_JSON bytes). A non-2xx
    /// answer becomes `on_status`'s error.
    pub(super) fn json<T: serde::de::DeserializeOwned>(
        &self,
        url: Url,
        at: &str,
        on_status: impl Fn(&Status) -> Error,
    ) -> Result<T> {
        let f = self.get(url, at)?;
        self.parse(f, at, on_status)
    }

    /// A request to `url`, with the token when `token` is asked for and the
    /// URL is on the endpoint's origin (never elsewhere).
    pub(super) fn request(
        &self,
        method: reqwest::Method,
        url: Url,
        token: bool,
    ) -> reqwest::blocking::RequestBuilder {
        let same = self.same_origin(&url);
        let mut rb = self.client.request(method, url);
        if token && same {
            if let Some(t) = &self.token {
                rb = rb.bearer_auth(t);
            }
        }
        rb
    }

    /// Send a request that changes something (an upload, a commit): once,
    /// never repeated, never redirected; waits up to `wait` for the answer.
    pub(super) fn send_once(
        &self,
        rb: reqwest::blocking::RequestBuilder,
        wait: Duration,
        at: &str,
    ) -> Result<Fetched> {
        let resp = rb
            .timeout(wait)
            .send()
            .map_err(|e| self.send_error(e, at))?;
        if resp.status().is_redirection() {
            return Err(Error::Network(format!(
                "{at}: the server answered with a redirect ({}) where it should have taken \
                 the request; not followed",
                resp.status().as_u16()
            )));
        }
        let hub = resp.headers().clone();
        Ok(Fetched { resp, hub })
    }

    /// The JSON body of a 2xx answer (at most MAX_JSON bytes); any other
    /// answer becomes `on_status`'s error.
    pub(super) fn parse<T: serde::de::DeserializeOwned>(
        &self,
        f: Fetched,
        at: &str,
        on_status: impl Fn(&Status) -> Error,
    ) -> Result<T> {
        if !f.resp.status().is_success() {
            return Err(on_status(&self.status(f)));
        }
        let body = self.read_capped(f.resp, MAX_JSON, at)?;
        serde_json::from_slice(&body).map_err(|e| {
            Error::Network(format!(
                "{at}: the server's answer is not the JSON expected ({})",
                self.clean(&e.to_string())
            ))
        })
    }

    /// What a failed answer said, cleaned.
    pub(super) fn status(&self, f: Fetched) -> Status {
        let code = f.resp.status().as_u16();
        let header = |k: &str| {
            f.resp
                .headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(|s| self.clean(s))
        };
        let error_code = header("x-error-code");
        let mut message = header("x-error-message");
        if message.is_none() {
            let mut body = Vec::new();
            let _ = f.resp.take(MAX_ERROR_TEXT).read_to_end(&mut body);
            let text = String::from_utf8_lossy(&body);
            let from_json = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
            let m = self.clean(from_json.as_deref().unwrap_or(&text));
            message = (!m.is_empty()).then_some(m);
        }
        Status {
            code,
            error_code,
            message,
        }
    }
}

/// A failed answer: its status, the Hub's X-Error-Code and its message.
pub(super) struct Status {
    pub code: u16,
    pub error_code: Option<String>,
    pub message: Option<String>,
}

impl Status {
    /// "503 (Service Unavailable: the server's message)".
    pub(super) fn describe(&self) -> String {
        let reason = reqwest::StatusCode::from_u16(self.code)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        match &self.message {
            Some(m) => format!("{} {reason}: {m}", self.code),
            None => format!("{} {reason}", self.code),
        }
    }
}

/// The value of header `k`, when it is text.
pub(super) fn header<'a>(h: &'a HeaderMap, k: &str) -> Option<&'a str> {
    h.get(k).and_then(|v| v.to_str().ok()).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_text_loses_the_token_and_control_characters() {
        let s = clean("bad token hf_abc\x1b[31m\r\nFAKE: ok", Some("hf_abc"));
        assert_eq!(s, "bad token [token] [31m  FAKE: ok");
        assert_eq!(clean(&"x".repeat(400), None).chars().count(), 301);
    }

    #[test]
    fn the_token_goes_only_to_the_endpoints_origin() {
        let http = Http {
            client: Client::new(),
            endpoint: Url::parse("http://127.0.0.1:8080").unwrap(),
            token: None,
        };
        let base = Url::parse("http://127.0.0.1:8080/o/n/resolve/x/f").unwrap();
        for (loc, same) in [
            ("/o/n/resolve/y/f", true),
            ("http://127.0.0.1:8080/x", true),
            ("/\\evil.example/x", false),
            ("\\\\evil.example/x", false),
            ("//evil.example/x", false),
            ("/\t/evil.example/x", false),
            ("https://127.0.0.1:8080/x", false),
            ("http://127.0.0.1:8081/x", false),
        ] {
            let u = base.join(loc).unwrap();
            assert_eq!(http.same_origin(&u), same, "{loc:?} -> {u}");
        }
    }
}
