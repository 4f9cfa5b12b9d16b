//! Bounding text for storage and for the terminal, and keeping secrets out of what is shown.

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
/// multi-line errors.
pub fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    match line.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_owned(),
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`. A URL that does not parse
/// has everything between `://` and the last `@` masked, so a password is never echoed.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => match (raw.find("://"), raw.rfind('@')) {
            (Some(start), Some(at)) if at > start + 3 => format!("{}***{}", &raw[..start + 3], &raw[at..]),
            _ => raw.to_owned(),
        },
    }
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
}
