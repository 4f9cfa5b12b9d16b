//! Bounding text for storage and for the terminal, and keeping secrets out of what is shown.

use std::borrow::Cow;

/// `text` as PostgreSQL can store it: `text` and `jsonb` cannot hold a NUL character, so each
/// one becomes U+FFFD (the replacement character) instead of failing the whole write.
pub fn storable(text: String) -> String {
    if text.contains('\0') { text.replace('\0', "\u{FFFD}") } else { text }
}

/// `text` cut to at most `max_bytes` on a character boundary, and [`storable`]: what bounded text
/// columns such as `last_error` store, so one pathological message cannot bloat a row or fail
/// the write that records it.
pub fn clip(text: String, max_bytes: usize) -> String {
    let mut text = storable(text);
    if text.len() > max_bytes {
        let mut end = max_bytes;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// The first line of `text`, at most `max` characters (with `…` when cut): how CLI tables show
/// multi-line errors. Not escaped: text for a terminal goes through [`terminal`] as well.
pub fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    match line.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_owned(),
    }
}

/// `text` safe to write to a terminal: every control character (C0 including newline and tab,
/// DEL, C1) is shown escaped (`\x1b`, `\r`, `\n`, `\u{9b}`) instead of written raw. Chat
/// messages, task ids and errors are written by models and producers: raw, an ESC or CSI could
/// clear the screen, move the cursor, retitle the window or forge lines that look like the
/// CLI's own; a CR could overwrite what the line showed. `--json` output needs none of this
/// (JSON escapes control characters itself).
pub fn terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => shown.push_str("\\n"),
            '\r' => shown.push_str("\\r"),
            '\t' => shown.push_str("\\t"),
            // C0 and DEL: one byte each.
            '\0'..='\x1f' | '\x7f' => shown.push_str(&format!("\\x{:02x}", u32::from(c))),
            // C1 (U+0080..=U+009F): `\u{9b}`, the spelling Rust and JSON readers know.
            c if c.is_control() => shown.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => shown.push(c),
        }
    }
    Cow::Owned(shown)
}

/// Connection-string parameters whose values are secrets (libpq: the password and the client
/// key's passphrase).
const SECRET_PARAMETERS: [&str; 2] = ["password", "sslpassword"];

/// A connection string with its secrets masked, for errors, logs and `config print`:
/// - a URL's user-info password: `postgres://user:secret@host/db` → `postgres://user:***@host/db`;
/// - a secret in a URL's query: `postgres://h/db?user=u&password=p` → `…&password=***`;
/// - a secret in a key=value string: `host=h password=p` → `host=h password=***` (quoted values
///   too).
///
/// A URL that does not parse has everything between `://` and the last `@` masked, and its
/// query secrets too, so a password is never echoed.
pub fn redact_url(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else { return redact_key_values(raw) };
    if let Ok(mut url) = url::Url::parse(raw) {
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        }
        if let Some(query) = url.query().map(redact_query) {
            url.set_query(Some(&query));
        }
        return url.to_string();
    }
    // Everything up to the last `@` may be user-info (a password can hold `/`, `?` or `@`).
    let (masked, rest) = match raw.rfind('@') {
        Some(at) if at > scheme_end + 3 => (format!("{}***", &raw[..scheme_end + 3]), &raw[at..]),
        _ => (String::new(), raw),
    };
    match rest.split_once('?') {
        Some((before, query)) => format!("{masked}{before}?{}", redact_query(query)),
        None => format!("{masked}{rest}"),
    }
}

/// `name=value&…` with the value of every secret parameter replaced by `***` (names compared
/// after percent-decoding; everything else kept as written).
fn redact_query(query: &str) -> String {
    let pairs = query.split('&').map(|pair| {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        let decoded = url::form_urlencoded::parse(name.as_bytes()).next().map(|(name, _)| name);
        match decoded {
            Some(decoded) if SECRET_PARAMETERS.contains(&&*decoded) => format!("{name}=***"),
            _ => pair.to_owned(),
        }
    });
    pairs.collect::<Vec<_>>().join("&")
}

/// libpq's `key = value …` form with every secret value replaced by `***`. Values may be
/// single-quoted with `\'` and `\\` escapes; spaces around `=` are allowed.
fn redact_key_values(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    loop {
        let spaces = rest.len() - rest.trim_start().len();
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
        if rest.is_empty() {
            return out;
        }
        let name_end = rest.find(|c: char| c == '=' || c.is_whitespace()).unwrap_or(rest.len());
        let name = &rest[..name_end];
        let after_name = &rest[name_end..];
        let Some(after_eq) = after_name.trim_start().strip_prefix('=') else {
            // Not `key=value`: keep the word (a stray `=` is a word of its own) and go on.
            let word = name_end.max(1);
            out.push_str(&rest[..word]);
            rest = &rest[word..];
            continue;
        };
        let value_start = rest.len() - after_eq.trim_start().len();
        let value_len = value_len(&rest[value_start..]);
        out.push_str(&rest[..value_start]);
        if SECRET_PARAMETERS.contains(&name) {
            out.push_str("***");
        } else {
            out.push_str(&rest[value_start..value_start + value_len]);
        }
        rest = &rest[value_start + value_len..];
    }
}

/// Length in bytes of the value at the start of `text`: a single-quoted string (to its closing
/// quote, or the end) or a word (to the next whitespace).
fn value_len(text: &str) -> usize {
    if !text.starts_with('\'') {
        return text.find(char::is_whitespace).unwrap_or(text.len());
    }
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return i + 1,
            _ => {}
        }
    }
    text.len()
}

/// `error: cause: cause…`, each text once: what the CLI prints and how errors whose own text
/// says little (tokio-postgres's "db error") are shown. Many of this crate's errors already put
/// their source in their own text (so a log's `%error` is whole) and also return it as their
/// `source()`; a cause whose text is already shown adds nothing, and once the deepest cause's
/// text is in, the chain has been told.
pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let causes: Vec<String> =
        std::iter::successors(error.source(), |cause| cause.source()).map(ToString::to_string).collect();
    if causes.last().is_some_and(|root| text.contains(root.as_str())) {
        return text;
    }
    for cause in causes {
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_on_a_char_boundary_and_leaves_short_text_alone() {
        assert_eq!(clip("short".into(), 10), "short");
        let cut = clip("é".repeat(10), 5);
        assert_eq!(cut, "éé", "5 bytes hold two 2-byte characters");
    }

    #[test]
    fn storable_and_clip_replace_the_nul_character_postgresql_cannot_store() {
        assert_eq!(storable("a\0b".into()), "a\u{FFFD}b");
        assert_eq!(storable("plain".into()), "plain");
        assert_eq!(clip("crashed \0 here".into(), 100), "crashed \u{FFFD} here");
    }

    #[test]
    fn one_line_keeps_the_first_line_and_bounds_it_in_characters() {
        assert_eq!(one_line("WRONGTYPE x\nsecond", 120), "WRONGTYPE x");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("ééé", 3), "ééé");
    }

    #[test]
    fn terminal_escapes_every_control_character_and_leaves_other_text_alone() {
        assert!(matches!(terminal("plain text, é ü 中"), Cow::Borrowed(_)));
        assert_eq!(terminal("\x1b[2Jgone"), "\\x1b[2Jgone");
        assert_eq!(terminal("ok\rfake"), "ok\\rfake");
        assert_eq!(terminal("a\nb\tc\x07d\x7fe\0"), "a\\nb\\tc\\x07d\\x7fe\\x00");
        // C1: U+009B is a one-character CSI on terminals that honour 8-bit controls.
        assert_eq!(terminal("x\u{9b}2Jy\u{85}"), "x\\u{9b}2Jy\\u{85}");
        for raw in ["\x1b]0;title\x07", "\u{9b}31m", "\r\n\x08\x7f"] {
            let shown = terminal(raw);
            assert!(!shown.chars().any(char::is_control), "{raw:?} → {shown:?}");
        }
    }

    #[test]
    fn redact_url_masks_a_password_in_the_query_string() {
        assert_eq!(redact_url("postgres://h/db?user=u&password=p"), "postgres://h/db?user=u&password=***");
        assert_eq!(
            redact_url("postgres://h/db?password=p%26q&sslmode=verify-full&sslpassword=k"),
            "postgres://h/db?password=***&sslmode=verify-full&sslpassword=***"
        );
        assert_eq!(redact_url("postgres://u:a@h/db?pass%77ord=b"), "postgres://u:***@h/db?pass%77ord=***");
        // Unparseable: both the user-info and the query secret are masked.
        assert_eq!(redact_url("postgres://u:a@[::1/db?password=b"), "postgres://***@[::1/db?password=***");
        assert_eq!(redact_url("postgres://h/db?application_name=x"), "postgres://h/db?application_name=x");
    }

    #[test]
    fn redact_url_masks_a_password_in_a_key_value_string() {
        assert_eq!(redact_url("host=h password=p"), "host=h password=***");
        assert_eq!(redact_url("host=h password = p dbname=d"), "host=h password = *** dbname=d");
        assert_eq!(redact_url("password='a \\' secret' host=h user=u"), "password=*** host=h user=u");
        assert_eq!(redact_url("host=h sslpassword=k user=u"), "host=h sslpassword=*** user=u");
        assert_eq!(redact_url("host=h user=password"), "host=h user=password");
        for raw in ["password=hunter2", "  password=hunter2  ", "host=h password='hunter2"] {
            assert!(!redact_url(raw).contains("hunter2"), "{raw}: {}", redact_url(raw));
        }
        // Outside input: no prefix of an awkward string makes it panic.
        let awkward = " host = 'a\\' b' ü=é password = 'x y' = =  ";
        for (end, _) in awkward.char_indices() {
            redact_url(&awkward[..end]);
        }
    }

    /// An error with a fixed text and an optional source, to build chains.
    #[derive(Debug)]
    struct Link(&'static str, Option<Box<Link>>);

    impl std::fmt::Display for Link {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Link {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|link| link as &(dyn std::error::Error + 'static))
        }
    }

    fn chain(texts: &[&'static str]) -> Link {
        let (last, rest) = texts.split_last().expect("one text at least");
        rest.iter().rev().fold(Link(last, None), |source, text| Link(text, Some(Box::new(source))))
    }

    #[test]
    fn with_causes_shows_each_text_of_the_chain_once() {
        // tokio-postgres: the kind alone, the server's message in the source.
        assert_eq!(
            with_causes(&chain(&["db error", "ERROR: relation \"x\" does not exist"])),
            "db error: ERROR: relation \"x\" does not exist"
        );
        // `#[error("migration failed: {0}")] Refinery(#[from] …)`: the source is in the text.
        assert_eq!(
            with_causes(&chain(&["migration failed: V3 differs", "V3 differs"])),
            "migration failed: V3 differs"
        );
        // The text tells the chain down to its root, through a wrapper it words its own way.
        let pool = chain(&[
            "no connection: cannot connect: error connecting to server: refused",
            "Error occurred while creating a new object: error connecting to server",
            "error connecting to server",
            "refused",
        ]);
        assert_eq!(with_causes(&pool), "no connection: cannot connect: error connecting to server: refused");
        // A context that does not name its cause gets the causes it lacks.
        let context = chain(&["cannot load config/worker.toml", "parse error: bad key", "bad key"]);
        assert_eq!(with_causes(&context), "cannot load config/worker.toml: parse error: bad key");
        assert_eq!(with_causes(&chain(&["alone"])), "alone");
    }
}
