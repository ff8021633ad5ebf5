//! The owner's view: `GET /api/review/summary` (counts, negative rate, rating distributions
//! over time, delivery health), `GET /api/review/feedback` (the votes themselves, newest
//! first, with comments and trace links) and the `/review` page that draws them; the `export`
//! command writes the same items ([`export`]).
//!
//! Who may look: the users named in `[review] users`. Anyone else signed in gets 403; with no
//! reviewers configured the whole surface is 404. A reviewer sees every user's feedback; with
//! `pseudonymize_users` users are shown as a stable pseudonym (an HMAC of the user under a
//! configured key) instead of their email. Answers are `cache-control: no-store`.
//!
//! Everything is read from the store (`store::review`); nothing here calls MLflow.

pub mod dataset;
pub mod export;
pub mod query;

use std::collections::BTreeMap;
use std::time::SystemTime;

use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::body::{Body, json_response};
use crate::config::{Config, IdentityConfig, ReviewConfig};
use crate::domain::{FeedbackValue, Polarity};
use crate::error::Error;
use crate::identity;
use crate::store::{ReviewedVote, SharedStore, SummaryCell, SummaryQuery};

/// The review page (`ui/review.html`, compiled into the binary).
const REVIEW_HTML: &str = include_str!("../ui/review.html");

/// Same stance as the chat page: everything inline, talking only to this origin.
const PAGE_CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// What a review request asks for (see `route::Route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Summary,
    Feedback,
    Html,
}

pub struct Review {
    config: ReviewConfig,
    identity: IdentityConfig,
    experiment_id: Option<String>,
    store: SharedStore,
    pseudonyms: Option<ring::hmac::Key>,
}

impl Review {
    pub fn new(config: &Config, store: SharedStore) -> Self {
        let review = config.review.clone();
        let pseudonyms = review
            .pseudonym_key
            .as_ref()
            .filter(|_| review.pseudonymize_users)
            .map(|k| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.expose().as_bytes()));
        Self {
            config: review,
            identity: config.identity.clone(),
            experiment_id: config.mlflow.experiment_id.clone(),
            store,
            pseudonyms,
        }
    }

    /// Serves `page`: 404 when no reviewers are configured, 401 without an identity, 403 for a
    /// user who is not a reviewer.
    pub async fn handle(
        &self,
        page: Page,
        method: &Method,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Response<Body>, Error> {
        if !self.config.enabled() {
            return Err(Error::NotFound(
                "the review surface is off (no [review] users are configured)".to_owned(),
            ));
        }
        if !matches!(*method, Method::GET | Method::HEAD) {
            return Err(Error::MethodNotAllowed {
                method: method.clone(),
                allowed: "GET, HEAD",
            });
        }
        let user = identity::user(headers, &self.identity)?;
        if !self.config.is_reviewer(&user) {
            return Err(Error::Forbidden(
                "only the users named in [review] users may see the review surface".to_owned(),
            ));
        }
        let now = SystemTime::now();
        let mut res = match page {
            Page::Html => html(),
            Page::Summary => {
                let q = query::summary(query, now)?;
                json_response(StatusCode::OK, &self.summary(&q).await?)
            }
            Page::Feedback => {
                let (q, after) = query::feedback(query, now, self.config.thresholds)?;
                let mut page = q.clone();
                page.limit = q.limit + 1;
                let mut rows = self.store.review_votes(&page, after.as_ref()).await?;
                let more = rows.len() > q.limit as usize;
                rows.truncate(q.limit as usize);
                let next = more
                    .then(|| rows.last().map(|r| r.cursor().encode()))
                    .flatten();
                let items: Vec<Value> = rows.iter().map(|r| Value::Object(self.item(r))).collect();
                json_response(StatusCode::OK, &json!({"items": items, "nextCursor": next}))
            }
        };
        res.headers_mut()
            .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if *method == Method::HEAD {
            *res.body_mut() = Body::Empty;
        }
        Ok(res)
    }

    /// The summary of `q`: every bucket of the range (empty ones included, so charts need no
    /// gap filling), the totals, and the delivery counts.
    pub async fn summary(&self, q: &SummaryQuery) -> Result<Value, Error> {
        let (cells, stats) =
            tokio::join!(self.store.review_summary(q), self.store.review_backlog());
        let (cells, stats) = (cells?, stats?);
        let (from_h, to_h) = q.hours();
        let per = i64::from(q.bucket_hours.max(1));
        let (first, end) = (from_h.div_euclid(per), (to_h + per - 1).div_euclid(per));
        let mut buckets: Vec<Totals> = (first..end).map(|_| Totals::default()).collect();
        let mut total = Totals::default();
        for cell in &cells {
            let b = cell
                .bucket
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64 / 3600)
                .div_euclid(per);
            if let Some(slot) = usize::try_from(b - first)
                .ok()
                .and_then(|i| buckets.get_mut(i))
            {
                slot.add(cell, &self.config);
            }
            total.add(cell, &self.config);
        }
        let bucket_list: Vec<Value> = buckets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut v = t.to_json(false);
                v["start"] = json!(rfc3339(q.bucket_start(first + i as i64)));
                v
            })
            .collect();
        Ok(json!({
            "from": rfc3339(q.bucket_start(first)),
            "to": rfc3339(q.bucket_start(end)),
            "bucket": if per == 1 { "hour" } else { "day" },
            "name": q.scope.name,
            "route": q.scope.route,
            "total": total.to_json(true),
            "buckets": bucket_list,
            "delivery": {"pending": stats.pending, "waiting": stats.waiting, "dead": stats.dead},
        }))
    }

    /// One vote as the listing and the export show it.
    pub fn item(&self, v: &ReviewedVote) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("time".into(), json!(rfc3339(v.updated_at)));
        m.insert("user".into(), json!(self.user_label(&v.key.user_id)));
        m.insert("chatId".into(), json!(v.chat_id));
        m.insert("messageId".into(), json!(v.key.message_id));
        m.insert("name".into(), json!(v.key.name));
        m.insert("value".into(), v.value.to_json());
        m.insert(
            "polarity".into(),
            json!(v.value.polarity(&self.config.thresholds)),
        );
        m.insert("comment".into(), json!(v.comment));
        m.insert("route".into(), json!(v.route));
        m.insert(
            "deliveryStatus".into(),
            json!(v.delivery.map(|s| s.as_str())),
        );
        m.insert("deliveryError".into(), json!(v.last_error));
        m.insert("traceId".into(), json!(v.trace_id));
        m.insert(
            "traceUrl".into(),
            json!(v.trace_id.as_deref().and_then(|t| self.trace_url(t))),
        );
        m
    }

    /// The user as a reviewer is shown them: the email, or `user-` and 12 hex digits of an
    /// HMAC-SHA256 of the lower-cased user under `review.pseudonym_key`.
    pub fn user_label(&self, user: &str) -> String {
        match &self.pseudonyms {
            None => user.to_owned(),
            Some(key) => {
                let tag = ring::hmac::sign(key, user.to_ascii_lowercase().as_bytes());
                let hex: String = tag.as_ref()[..6]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                format!("user-{hex}")
            }
        }
    }

    fn trace_url(&self, trace_id: &str) -> Option<String> {
        use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
        /// Everything but RFC 3986's unreserved characters.
        const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        let template = self.config.trace_url.as_deref()?;
        let enc = |s: &str| utf8_percent_encode(s, COMPONENT).to_string();
        Some(template.replace("{trace_id}", &enc(trace_id)).replace(
            "{experiment_id}",
            &enc(self.experiment_id.as_deref().unwrap_or("")),
        ))
    }
}

/// Counts of one bucket (or of the whole range).
#[derive(Default)]
struct Totals {
    votes: i64,
    up: i64,
    down: i64,
    commented: i64,
    names: BTreeMap<String, NameTotals>,
}

#[derive(Default)]
struct NameTotals {
    votes: i64,
    numeric: i64,
    sum: f64,
    /// Numeric value → votes, in value order.
    distribution: Vec<(f64, i64)>,
}

impl Totals {
    fn add(&mut self, cell: &SummaryCell, config: &ReviewConfig) {
        self.votes += cell.votes;
        self.commented += cell.commented;
        match cell.value.polarity(&config.thresholds) {
            Some(Polarity::Positive) => self.up += cell.votes,
            Some(Polarity::Negative) => self.down += cell.votes,
            None => {}
        }
        let name = self.names.entry(cell.name.clone()).or_default();
        name.votes += cell.votes;
        if let FeedbackValue::Number(n) = cell.value {
            name.numeric += cell.votes;
            name.sum += n * cell.votes as f64;
            match name.distribution.binary_search_by(|(v, _)| v.total_cmp(&n)) {
                Ok(i) => name.distribution[i].1 += cell.votes,
                Err(i) => name.distribution.insert(i, (n, cell.votes)),
            }
        }
    }

    fn to_json(&self, with_distribution: bool) -> Value {
        let polar = self.up + self.down;
        let names: Map<String, Value> = self
            .names
            .iter()
            .map(|(name, t)| {
                let mut v = json!({
                    "votes": t.votes,
                    "mean": (t.numeric > 0).then(|| t.sum / t.numeric as f64),
                });
                if with_distribution && t.numeric > 0 {
                    v["distribution"] = t
                        .distribution
                        .iter()
                        .filter(|(_, n)| *n != 0)
                        .map(|(value, votes)| json!({"value": value, "votes": votes}))
                        .collect();
                }
                (name.clone(), v)
            })
            .collect();
        json!({
            "votes": self.votes,
            "up": self.up,
            "down": self.down,
            "negativeRate": (polar > 0).then(|| self.down as f64 / polar as f64),
            "withComment": self.commented,
            "names": names,
        })
    }
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn html() -> Response<Body> {
    let mut res = Response::new(Body::full(REVIEW_HTML.as_bytes().to_vec()));
    let h = res.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_CSP));
    res
}
