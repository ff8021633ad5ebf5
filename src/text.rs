//! Text helpers for messages and logs (a leaf: imports nothing from the crate).
//!
//! - [`chain`]: an error and its `source()` chain as one string;
//! - [`one_line`] / [`echo`]: a value fit to put in a log line or an error message (one line,
//!   bounded length).

/// The chain of `source()` messages of an error, joined with ": " (hyper's errors put the useful
/// part, such as "connection refused", several levels down).
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// Longest client-supplied value echoed in an error message, in characters.
pub const ECHO_MAX_CHARS: usize = 64;

/// A client-supplied value fit to echo in an error message: one line, at most
/// [`ECHO_MAX_CHARS`] characters (an ellipsis marks a cut).
pub fn echo(s: &str) -> String {
    one_line(s, ECHO_MAX_CHARS)
}

/// One line: control characters become spaces, runs of whitespace collapse, at most `max`
/// characters (an ellipsis marks a cut).
pub fn one_line(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max * 4));
    let mut count = 0;
    let mut pending_space = false;
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() {
            pending_space = count > 0;
            continue;
        }
        let needed = if pending_space { 2 } else { 1 };
        if count + needed > max {
            // Make room for the ellipsis.
            while count + 1 > max || out.ends_with(' ') {
                if out.pop().is_none() {
                    break;
                }
                count -= 1;
            }
            out.push('…');
            return out;
        }
        if pending_space {
            out.push(' ');
            count += 1;
            pending_space = false;
        }
        out.push(c);
        count += 1;
    }
    out
}
