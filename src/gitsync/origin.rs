//! Git remote origins (`chat_diff_statuses.git_remote_origin`) → host, owner, repository.
//!
//! Accepted forms (each with or without `.git` and a trailing slash):
//! `https://host[:port]/owner/repo`, `http://…`, `ssh://[user@]host[:port]/owner/repo`,
//! `git://…` and the scp-like `[user@]host:owner/repo`. The port is dropped: it belongs to the
//! transport (an SSH port says nothing about the API), and providers are matched by host name
//! alone. The host is lower-cased because host names are case-insensitive; owner and repository
//! keep their spelling (GitHub treats them case-insensitively, but they go back into API URLs
//! as given).

use std::fmt;
use std::str::FromStr;

/// A repository as named by its remote origin.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Lower-cased host name, without port.
    pub host: String,
    pub owner: String,
    pub repo: String,
}

/// An origin that names no `owner/repo` on a host. `origin` is the input with its user-info
/// replaced by `***` ([`redact`]), so the error can be logged and stored in `last_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("git remote origin {origin:?} is not a repository url: {problem}")]
pub struct OriginError {
    pub origin: String,
    pub problem: &'static str,
}

impl Origin {
    pub fn parse(input: &str) -> Result<Self, OriginError> {
        let fail = |problem| OriginError { origin: redact(input), problem };
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(fail("it is empty"));
        }
        let (host, path) = if trimmed.contains("://") {
            let url = url::Url::parse(trimmed).map_err(|_| fail("it does not parse as a url"))?;
            if !matches!(url.scheme(), "https" | "http" | "ssh" | "git" | "git+ssh") {
                return Err(fail("the scheme is not https, http, ssh or git"));
            }
            // Anything after the path is a query or a fragment.
            if !url[url::Position::AfterPath..].is_empty() {
                return Err(fail("it has a query or fragment"));
            }
            let host = url.host_str().ok_or_else(|| fail("it has no host"))?.to_owned();
            (host, url.path().to_owned())
        } else {
            // scp-like `[user@]host:path`; a `/` before the first `:` would make it a local path.
            let (authority, path) =
                trimmed.split_once(':').ok_or_else(|| fail("it is neither a url nor host:owner/repo"))?;
            if authority.contains('/') {
                return Err(fail("it is a local path, not a remote"));
            }
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            (host.to_owned(), path.to_owned())
        };
        if host.is_empty() {
            return Err(fail("it has no host"));
        }
        let path = path.trim_matches('/');
        let path = path.strip_suffix(".git").unwrap_or(path);
        let mut segments = path.split('/');
        let (owner, repo) = match (segments.next(), segments.next(), segments.next()) {
            (Some(owner), Some(repo), None) => (owner, repo),
            _ => return Err(fail("the path is not exactly owner/repo")),
        };
        let valid = |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
        if !valid(owner) || !valid(repo) {
            return Err(fail("the owner or repository name is empty or has whitespace"));
        }
        Ok(Origin { host: host.to_ascii_lowercase(), owner: owner.to_owned(), repo: repo.to_owned() })
    }
}

impl FromStr for Origin {
    type Err = OriginError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Origin::parse(s)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.host, self.owner, self.repo)
    }
}

/// `origin` with its whole user-info replaced by `***`: `https://ghp_x@github.com/o/r` →
/// `https://***@github.com/o/r`, `https://user:pw@…` and scp-like `user@host:o/r` alike.
/// Origins cloned with a token embedded (as the user name, the password or both) would
/// otherwise leak it into logs, `last_error` and CLI output; the user name of an SSH remote
/// (`git@`) is no secret, but telling a token from a user name is guesswork, so it goes too.
pub fn redact(origin: &str) -> String {
    let (prefix, rest) = match origin.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), origin),
    };
    // The user-info ends at the last `@` of the authority (a password may hold `@`); the
    // authority ends at the first `/` (a URL) or, scp-like, at the `:` before the path, which
    // comes after the `@`.
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{prefix}***{}", &rest[at..]),
        None => origin.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(host: &str, owner: &str, repo: &str) -> Origin {
        Origin { host: host.into(), owner: owner.into(), repo: repo.into() }
    }

    #[test]
    fn every_accepted_form_parses_to_host_owner_repo() {
        let cases = [
            ("https://github.com/octocat/Hello-World", origin("github.com", "octocat", "Hello-World")),
            ("https://github.com/octocat/Hello-World.git", origin("github.com", "octocat", "Hello-World")),
            ("https://github.com/octocat/Hello-World/", origin("github.com", "octocat", "Hello-World")),
            ("https://github.com/octocat/Hello-World.git/", origin("github.com", "octocat", "Hello-World")),
            ("https://GitHub.com/octocat/Hello-World", origin("github.com", "octocat", "Hello-World")),
            ("https://ghe.example.com:8443/o/r.git", origin("ghe.example.com", "o", "r")),
            ("https://x-access-token:secret@github.com/o/r.git", origin("github.com", "o", "r")),
            ("http://git.internal/o/r", origin("git.internal", "o", "r")),
            ("git@github.com:octocat/Hello-World.git", origin("github.com", "octocat", "Hello-World")),
            ("git@github.com:octocat/Hello-World", origin("github.com", "octocat", "Hello-World")),
            ("git@github.com:octocat/Hello-World.git/", origin("github.com", "octocat", "Hello-World")),
            ("github.com:octocat/Hello-World", origin("github.com", "octocat", "Hello-World")),
            ("ssh://git@github.com/octocat/Hello-World.git", origin("github.com", "octocat", "Hello-World")),
            (
                "ssh://git@github.com:2222/octocat/Hello-World.git",
                origin("github.com", "octocat", "Hello-World"),
            ),
            ("ssh://git@github.com/octocat/Hello-World/", origin("github.com", "octocat", "Hello-World")),
            ("git://github.com/o/r.git", origin("github.com", "o", "r")),
            ("  https://github.com/o/r.js.git \n", origin("github.com", "o", "r.js")),
        ];
        for (input, want) in cases {
            assert_eq!(Origin::parse(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn malformed_origins_are_rejected_with_the_origin_named() {
        let cases = [
            "",
            "   ",
            "github.com/o/r",
            "/home/me/repo",
            "./repo:x",
            "https://github.com/o",
            "https://github.com/o/r/tree/main",
            "https://github.com//r",
            "https://github.com/o/r?x=1",
            "ftp://github.com/o/r",
            "git@github.com:o",
            "git@:o/r",
            "ssh://git@github.com/o/r/extra.git",
            "file:///srv/git/o/r.git",
        ];
        for input in cases {
            let err = Origin::parse(input).expect_err(input);
            assert_eq!(err.origin, redact(input), "{input}");
            assert!(err.to_string().contains(&format!("{:?}", redact(input))), "{err}");
        }
    }

    #[test]
    fn the_user_info_of_a_bad_origin_is_masked_in_the_error() {
        for (input, shown) in [
            ("https://x-access-token:ghp_secret@github.com/o", "https://***@github.com/o"),
            ("https://ghp_secret@github.com/o", "https://***@github.com/o"),
            ("https://ghp_secret@github.com/o/r/extra", "https://***@github.com/o/r/extra"),
            ("https://u:p@ss:ghp_secret@github.com/o", "https://***@github.com/o"),
            ("ssh://ghp_secret@github.com:22/o", "ssh://***@github.com:22/o"),
            ("ghp_secret@github.com:o", "***@github.com:o"),
        ] {
            let err = Origin::parse(input).expect_err(input);
            assert_eq!(err.origin, shown, "{input}");
            assert!(!err.to_string().contains("ghp_secret"), "{err}");
        }
    }

    #[test]
    fn redact_masks_the_whole_user_info_and_leaves_the_rest() {
        assert_eq!(redact("https://ghp_x@github.com/o/r"), "https://***@github.com/o/r");
        assert_eq!(
            redact("https://x-access-token:ghp_x@github.com/o/r.git"),
            "https://***@github.com/o/r.git"
        );
        assert_eq!(redact("git@github.com:o/r.git"), "***@github.com:o/r.git");
        assert_eq!(redact("https://github.com/o/r"), "https://github.com/o/r");
        assert_eq!(redact("https://github.com/o/r@main"), "https://github.com/o/r@main", "an @ in the path");
        assert_eq!(redact("github.com:o/r"), "github.com:o/r");
    }

    #[test]
    fn display_is_host_owner_repo() {
        assert_eq!(origin("github.com", "o", "r").to_string(), "github.com/o/r");
    }
}
