//! The query strings of `/api/review/summary` and `/api/review/feedback` (and the `export`
//! command's options): parsed into store queries, with errors that name the parameter and say
//! what was expected. Unknown and repeated parameters are refused, so a typo never silently
//! widens what a reviewer sees.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::config::{MAX_PAGE, valid_assessment_name};
use crate::domain::{Polarity, Thresholds};
use crate::error::Error;
use crate::store::{ListQuery, ReviewCursor, ReviewScope, SummaryQuery};

/// Default summary range: the last week.
pub const DEFAULT_SUMMARY_RANGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default listing page.
pub const DEFAULT_PAGE: u32 = 50;
/// Most buckets one summary may return (about 83 days of hours, 5 years of days).
pub const MAX_BUCKETS: i64 = 2000;

fn bad(param: &str, expected: &str) -> Error {
    Error::bad_request("INVALID_PARAMETER", format!("{param}: expected {expected}"))
}

/// The parameters of a query string; each at most once, each one of `allowed`.
pub fn params(query: Option<&str>, allowed: &[&str]) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(Error::bad_request(
                "UNKNOWN_PARAMETER",
                format!(
                    "unknown parameter \"{}\" (allowed: {})",
                    crate::text::echo(&k),
                    allowed.join(", ")
                ),
            ));
        }
        if out.insert(k.clone().into_owned(), v.into_owned()).is_some() {
            return Err(Error::bad_request(
                "DUPLICATE_PARAMETER",
                format!("parameter \"{k}\" is given more than once"),
            ));
        }
    }
    Ok(out)
}

const TIME_EXPECTED: &str = "an RFC 3339 time (2026-11-01T00:00:00Z), a date (2026-11-01, UTC) or milliseconds since the Unix epoch";

/// An RFC 3339 time, a UTC date or epoch milliseconds.
pub fn time(param: &str, raw: &str) -> Result<SystemTime, Error> {
    let raw = raw.trim();
    if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        return raw
            .parse::<u64>()
            .ok()
            .and_then(|ms| SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
            .ok_or_else(|| bad(param, TIME_EXPECTED));
    }
    let full = if raw.len() == 10 {
        format!("{raw}T00:00:00Z")
    } else {
        raw.to_owned()
    };
    humantime::parse_rfc3339_weak(&full).map_err(|_| bad(param, TIME_EXPECTED))
}

/// `from`, `to`, `name` and `route`: the scope every review query shares.
fn scope(
    p: &BTreeMap<String, String>,
    now: SystemTime,
    default_range: Option<Duration>,
) -> Result<ReviewScope, Error> {
    let to = p
        .get("to")
        .map(|t| time("to", t))
        .transpose()?
        .unwrap_or(now);
    let from = match p.get("from") {
        Some(f) => time("from", f)?,
        None => default_range
            .and_then(|r| to.checked_sub(r))
            .unwrap_or(SystemTime::UNIX_EPOCH),
    };
    if from > to {
        return Err(Error::bad_request(
            "INVALID_PARAMETER",
            "from: must not be after to",
        ));
    }
    let name = match p.get("name") {
        Some(n) if valid_assessment_name(n) => Some(n.clone()),
        Some(_) => {
            return Err(bad(
                "name",
                "an assessment name (1-64 letters, digits, '_', '-', '.' or ' ')",
            ));
        }
        None => None,
    };
    let route = match p.get("route") {
        Some(r) if r.starts_with('/') && r.len() <= 256 && !r.chars().any(char::is_control) => {
            Some(r.clone())
        }
        Some(_) => return Err(bad("route", "an agent route's path, such as /invocations")),
        None => None,
    };
    Ok(ReviewScope {
        from,
        to,
        name,
        route,
    })
}

pub const SUMMARY_PARAMS: [&str; 5] = ["from", "to", "bucket", "name", "route"];

/// `GET /api/review/summary`'s parameters. `bucket` defaults to `hour` for ranges up to two
/// days and `day` beyond.
pub fn summary(query: Option<&str>, now: SystemTime) -> Result<SummaryQuery, Error> {
    let p = params(query, &SUMMARY_PARAMS)?;
    let scope = scope(&p, now, Some(DEFAULT_SUMMARY_RANGE))?;
    let span = scope.to.duration_since(scope.from).unwrap_or_default();
    let bucket_hours = match p.get("bucket").map(String::as_str) {
        Some("hour") => 1,
        Some("day") => 24,
        None if span <= Duration::from_secs(2 * 24 * 3600) => 1,
        None => 24,
        Some(_) => return Err(bad("bucket", "\"hour\" or \"day\"")),
    };
    let q = SummaryQuery {
        scope,
        bucket_hours,
    };
    let (from, to) = q.hours();
    let per = i64::from(bucket_hours);
    if to.div_euclid(per) - from.div_euclid(per) > MAX_BUCKETS {
        return Err(Error::bad_request(
            "RANGE_TOO_LONG",
            format!(
                "the range holds more than {MAX_BUCKETS} {} buckets; use bucket=day or a shorter range",
                if per == 1 { "hourly" } else { "daily" }
            ),
        ));
    }
    Ok(q)
}

pub const FEEDBACK_PARAMS: [&str; 8] = [
    "value",
    "has_comment",
    "from",
    "to",
    "name",
    "route",
    "limit",
    "cursor",
];

/// `GET /api/review/feedback`'s parameters: the listing query and where to continue.
pub fn feedback(
    query: Option<&str>,
    now: SystemTime,
    thresholds: Thresholds,
) -> Result<(ListQuery, Option<ReviewCursor>), Error> {
    let p = params(query, &FEEDBACK_PARAMS)?;
    let scope = scope(&p, now, None)?;
    let polarity = match p.get("value").map(String::as_str) {
        None | Some("all") => None,
        Some("negative") => Some(Polarity::Negative),
        Some("positive") => Some(Polarity::Positive),
        Some(_) => return Err(bad("value", "\"negative\", \"positive\" or \"all\"")),
    };
    let has_comment = match p.get("has_comment").map(String::as_str) {
        None => None,
        Some("true" | "1") => Some(true),
        Some("false" | "0") => Some(false),
        Some(_) => return Err(bad("has_comment", "true or false")),
    };
    let limit = match p.get("limit") {
        None => DEFAULT_PAGE,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| bad("limit", &format!("an integer from 1 to {MAX_PAGE}")))?,
    };
    let cursor = p
        .get("cursor")
        .map(|c| {
            ReviewCursor::decode(c)
                .ok_or_else(|| bad("cursor", "the nextCursor of a previous page"))
        })
        .transpose()?;
    Ok((
        ListQuery {
            scope,
            polarity,
            has_comment,
            thresholds,
            limit,
        },
        cursor,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn times_take_rfc3339_dates_and_milliseconds() {
        let t = |s| time("from", s).unwrap();
        assert_eq!(
            t("2026-11-01"),
            humantime::parse_rfc3339("2026-11-01T00:00:00Z").unwrap()
        );
        assert_eq!(t("1000"), SystemTime::UNIX_EPOCH + Duration::from_secs(1));
        assert_eq!(
            t("2026-11-01T10:00:00Z"),
            humantime::parse_rfc3339("2026-11-01T10:00:00Z").unwrap()
        );
        let e = time("from", "yesterday").unwrap_err();
        assert!(e.to_string().starts_with("from: expected an RFC 3339 time"));
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        let e = summary(Some("frm=1"), now()).unwrap_err();
        assert_eq!(e.code(), "UNKNOWN_PARAMETER");
        assert!(e.to_string().contains("allowed: from, to"));
        let e = summary(Some("to=1&to=2"), now()).unwrap_err();
        assert_eq!(e.code(), "DUPLICATE_PARAMETER");
    }

    #[test]
    fn summary_defaults_to_a_week_of_days_and_bounds_buckets() {
        let q = summary(None, now()).unwrap();
        assert_eq!(q.bucket_hours, 24);
        assert_eq!(q.scope.to, now());
        assert_eq!(q.scope.from, now() - DEFAULT_SUMMARY_RANGE);
        let q = summary(Some("from=2026-11-01&to=2026-11-02"), now()).unwrap();
        assert_eq!(q.bucket_hours, 1);
        let e = summary(Some("from=2020-01-01&to=2026-01-01&bucket=hour"), now()).unwrap_err();
        assert_eq!(e.code(), "RANGE_TOO_LONG");
        assert_eq!(
            summary(Some("from=2026-11-02&to=2026-11-01"), now())
                .unwrap_err()
                .to_string(),
            "from: must not be after to"
        );
        assert!(summary(Some("bucket=week"), now()).is_err());
        assert!(summary(Some("name=a%0Ab"), now()).is_err());
        assert!(summary(Some("route=invocations"), now()).is_err());
    }

    #[test]
    fn feedback_filters_parse() {
        let (q, c) = feedback(
            Some("value=negative&has_comment=true&limit=10&name=rating&route=%2Finvocations"),
            now(),
            Thresholds::default(),
        )
        .unwrap();
        assert_eq!(q.polarity, Some(Polarity::Negative));
        assert_eq!(q.has_comment, Some(true));
        assert_eq!(q.limit, 10);
        assert_eq!(q.scope.name.as_deref(), Some("rating"));
        assert_eq!(q.scope.route.as_deref(), Some("/invocations"));
        assert_eq!(q.scope.from, SystemTime::UNIX_EPOCH);
        assert!(c.is_none());
        for bad in [
            "limit=0",
            "limit=501",
            "value=bad",
            "cursor=x",
            "has_comment=maybe",
        ] {
            assert!(
                feedback(Some(bad), now(), Thresholds::default()).is_err(),
                "{bad}"
            );
        }
    }
}
