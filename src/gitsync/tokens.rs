//! GitHub tokens at rest: `external_auth_links.access_token` (and `refresh_token`) as AES-256-GCM
//! ciphertext under the keys of `gitsync.token_keys`, the first of which encrypts while all of
//! them decrypt (rotation). Pure: no I/O, no clock; the callers are the refresher (decrypt), the
//! `put-token` and `encrypt-tokens` commands (encrypt, re-encrypt).
//!
//! The format, which the API tier may produce without this binary (README, "GitHub tokens at
//! rest"):
//!
//! - key: 32 random bytes, configured base64-encoded (standard alphabet, padded);
//! - key id (the `*_key_id` column): the first 7 lowercase hex digits of SHA-256(key bytes), as
//!   coder's dbcrypt names its keys;
//! - nonce: 12 random bytes, fresh for every encryption;
//! - AAD: `external_auth_links.<column>:<user_id>:<provider_id>` (column `access_token` or
//!   `refresh_token`, user id as lowercase hyphenated UUID), so a ciphertext copied to another
//!   row, or to the other column, does not decrypt;
//! - stored text: base64 (standard, padded) of `nonce || ciphertext || tag (16 bytes)`.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
/// Hex digits of a key id.
pub const KEY_ID_LEN: usize = 7;
/// Bytes of the GCM tag at the end of the sealed bytes.
pub const TAG_LEN: usize = 16;

/// One entry of `gitsync.token_keys` as configured (base64 text). Neither `Debug` nor anything
/// but [`crate::config::Config::render`]'s redaction ever shows it; `Serialize` writes the real
/// value (the config is only serialized to compute defaults and, redacted first, to print it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TokenKeySecret(String);

impl TokenKeySecret {
    pub fn new(base64_key: impl Into<String>) -> Self {
        Self(base64_key.into())
    }

    /// The base64 text as configured.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What `config print` shows instead of the key: its key id, when it is a valid key.
    pub fn redacted(&self) -> String {
        match decode_key(&self.0) {
            Ok(bytes) => format!("*** (key id {})", key_id(&bytes)),
            Err(_) => "***".to_owned(),
        }
    }
}

impl fmt::Debug for TokenKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKeySecret(***)")
    }
}

/// `gitsync.token_keys`: a list (`["k1", "k2"]` in TOML, `[k1,k2]` in an env variable), or one
/// string of comma-separated keys (`WORKER__GITSYNC__TOKEN_KEYS=k1,k2`); an empty string is no
/// key. Each entry is validated by [`TokenKeys::parse`], naming its index.
pub fn deserialize_key_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<TokenKeySecret>, D::Error> {
    struct KeyList;

    impl<'de> serde::de::Visitor<'de> for KeyList {
        type Value = Vec<TokenKeySecret>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of base64-encoded 32-byte keys, or one string of comma-separated keys")
        }

        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(split_key_list(value))
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut keys = Vec::new();
            while let Some(key) = seq.next_element::<TokenKeySecret>()? {
                keys.push(key);
            }
            Ok(keys)
        }
    }

    deserializer.deserialize_any(KeyList)
}

/// `k1, k2` (or `[k1, "k2"]`, which figment leaves a string when an element does not parse) →
/// the entries, trimmed and unquoted; empty text is no entry, an empty element stays (and is
/// refused by validation, naming its index).
fn split_key_list(text: &str) -> Vec<TokenKeySecret> {
    let text = text.trim();
    let text = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text).trim();
    if text.is_empty() {
        return Vec::new();
    }
    text.split(',')
        .map(|piece| {
            let piece = piece.trim();
            let unquoted = ['"', '\'']
                .iter()
                .find_map(|q| piece.strip_prefix(*q).and_then(|p| p.strip_suffix(*q)))
                .unwrap_or(piece);
            TokenKeySecret::new(unquoted)
        })
        .collect()
}

/// A configured key that cannot be used; `index` is its position in `gitsync.token_keys`. The
/// message never contains the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gitsync.token_keys.{index}: {problem}")]
pub struct KeyConfigError {
    pub index: usize,
    pub problem: KeyProblem,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error("empty")]
    Empty,
    #[error("not base64 (standard alphabet with `=` padding, as `openssl rand -base64 32` prints)")]
    NotBase64,
    #[error("decodes to {0} bytes; a key is 32 bytes")]
    WrongLength(usize),
    #[error("the same key as gitsync.token_keys.{0}")]
    Duplicate(usize),
    #[error(
        "its key id {id} is also the key id of gitsync.token_keys.{other} (another key): generate a new key"
    )]
    IdCollision { id: String, other: usize },
    #[error("not usable as an AES-256-GCM key")]
    Unusable,
}

/// Why a token could not be sealed or opened. Messages name the key id, never a key or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("gitsync.token_keys is empty: no key to encrypt with")]
    NoKeys,
    #[error("encrypted under key {key_id} but gitsync.token_keys is empty")]
    EncryptedWithoutKeys { key_id: String },
    #[error(
        "stored in plaintext while gitsync.token_keys is set: refused (encrypt it with `worker gitsync encrypt-tokens`)"
    )]
    Plaintext,
    #[error("unknown key id `{key_id}` (gitsync.token_keys has {known})")]
    UnknownKey { key_id: String, known: String },
    #[error("ciphertext is not base64")]
    NotBase64,
    #[error("ciphertext is {len} bytes, shorter than a nonce and a tag (28)")]
    TooShort { len: usize },
    #[error(
        "authentication failed under key {key_id} (the ciphertext was altered, belongs to another row or column, or \
         was sealed by another key)"
    )]
    Authentication { key_id: String },
    #[error("the decrypted token is not UTF-8")]
    NotUtf8,
    #[error("cannot draw a random nonce")]
    Random,
    #[error("AES-256-GCM sealing failed")]
    Seal,
}

/// The `external_auth_links` column a token lives in; part of its AAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    AccessToken,
    RefreshToken,
}

impl Column {
    pub fn as_str(self) -> &'static str {
        match self {
            Column::AccessToken => "access_token",
            Column::RefreshToken => "refresh_token",
        }
    }
}

/// The AAD binding a token to its row and column:
/// `external_auth_links.<column>:<user_id>:<provider_id>`.
pub fn aad(column: Column, user_id: Uuid, provider_id: &str) -> String {
    format!("external_auth_links.{}:{}:{provider_id}", column.as_str(), user_id.hyphenated())
}

/// The first 7 lowercase hex digits of SHA-256 of the key's bytes.
pub fn key_id(key: &[u8]) -> String {
    let sum = digest(&SHA256, key);
    let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    hex[..KEY_ID_LEN].to_owned()
}

fn decode_key(text: &str) -> Result<Vec<u8>, KeyProblem> {
    if text.is_empty() {
        return Err(KeyProblem::Empty);
    }
    let bytes = STANDARD.decode(text).map_err(|_| KeyProblem::NotBase64)?;
    if bytes.len() != KEY_LEN {
        return Err(KeyProblem::WrongLength(bytes.len()));
    }
    Ok(bytes)
}

struct TokenKey {
    id: String,
    aead: LessSafeKey,
}

/// The usable keys, in configured order: the first encrypts, every one decrypts.
#[derive(Default)]
pub struct TokenKeys {
    keys: Vec<TokenKey>,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeys").field("ids", &self.ids()).finish()
    }
}

impl TokenKeys {
    /// Parses `gitsync.token_keys`; the first bad entry is the error (index, problem).
    pub fn parse(entries: &[TokenKeySecret]) -> Result<Self, KeyConfigError> {
        let mut raw: Vec<Vec<u8>> = Vec::with_capacity(entries.len());
        let mut keys = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let fail = |problem| KeyConfigError { index, problem };
            let bytes = decode_key(entry.expose()).map_err(fail)?;
            let id = key_id(&bytes);
            if let Some(other) = raw.iter().position(|r| *r == bytes) {
                return Err(fail(KeyProblem::Duplicate(other)));
            }
            if let Some(other) = keys.iter().position(|k: &TokenKey| k.id == id) {
                return Err(fail(KeyProblem::IdCollision { id, other }));
            }
            let unbound = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| fail(KeyProblem::Unusable))?;
            keys.push(TokenKey { id, aead: LessSafeKey::new(unbound) });
            raw.push(bytes);
        }
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The id of the key that encrypts.
    pub fn primary_id(&self) -> Option<&str> {
        self.keys.first().map(|k| k.id.as_str())
    }

    /// Every key id, in configured order.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Seals `plaintext` under the first key with a fresh random nonce: (stored text, key id).
    pub fn encrypt(&self, plaintext: &str, aad: &str) -> Result<(String, String), TokenError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| TokenError::Random)?;
        self.encrypt_with_nonce(plaintext, aad, nonce)
    }

    fn encrypt_with_nonce(
        &self,
        plaintext: &str,
        aad: &str,
        nonce: [u8; NONCE_LEN],
    ) -> Result<(String, String), TokenError> {
        let key = self.keys.first().ok_or(TokenError::NoKeys)?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        sealed.extend_from_slice(&nonce);
        let mut in_out = plaintext.as_bytes().to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| TokenError::Seal)?;
        sealed.extend_from_slice(&in_out);
        Ok((STANDARD.encode(sealed), key.id.clone()))
    }

    /// Opens a stored text sealed under `key_id` for the row and column `aad` names.
    pub fn decrypt(&self, ciphertext: &str, key_id: &str, aad: &str) -> Result<String, TokenError> {
        let Some(key) = self.keys.iter().find(|k| k.id == key_id) else {
            if self.keys.is_empty() {
                return Err(TokenError::EncryptedWithoutKeys { key_id: key_id.to_owned() });
            }
            return Err(TokenError::UnknownKey { key_id: key_id.to_owned(), known: self.ids().join(", ") });
        };
        let mut sealed = STANDARD.decode(ciphertext.trim()).map_err(|_| TokenError::NotBase64)?;
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(TokenError::TooShort { len: sealed.len() });
        }
        let (nonce, in_out) = sealed.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| TokenError::TooShort { len: NONCE_LEN + in_out.len() })?;
        let plaintext = key
            .aead
            .open_in_place(nonce, Aad::from(aad.as_bytes()), in_out)
            .map_err(|_| TokenError::Authentication { key_id: key.id.clone() })?;
        String::from_utf8(plaintext.to_vec()).map_err(|_| TokenError::NotUtf8)
    }

    /// A stored column as the refresher may use it: decrypted when it has a key id; as is when
    /// it has none and no key is configured; refused when it has none but keys are configured
    /// (a plaintext row must not be sent once tokens are meant to be encrypted).
    pub fn reveal(&self, stored: &str, key_id: Option<&str>, aad: &str) -> Result<String, TokenError> {
        match key_id {
            Some(key_id) => self.decrypt(stored, key_id, aad),
            None if self.keys.is_empty() => Ok(stored.to_owned()),
            None => Err(TokenError::Plaintext),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes 0..32, and its key id (sha256sum of those bytes, first 7 digits).
    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_A_ID: &str = "630dcd2";
    const USER: Uuid = Uuid::from_u128(1);
    const TOKEN: &str = "gho_16C7e42F292c6912E7710c838347Ae178B4a";
    /// AES-256-GCM of TOKEN under KEY_A, nonce bytes 0..12, AAD of (USER, "github",
    /// access_token), computed independently (Python `cryptography`'s AESGCM) and base64'd with
    /// the nonce in front: the README's format, byte for byte.
    const VECTOR: &str =
        "AAECAwQFBgcICQoLIGq5RPTTgSzodaXNg9BKDrXvtga1TGhNCATdtiVaNIVAdZ/Ll4Mm+UXRk2QfIJuYuaWzHX72u54=";

    fn keys(entries: &[&str]) -> TokenKeys {
        let entries: Vec<_> = entries.iter().map(|e| TokenKeySecret::new(*e)).collect();
        TokenKeys::parse(&entries).expect("valid keys")
    }

    fn fresh_key() -> String {
        let mut bytes = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut bytes).expect("random");
        STANDARD.encode(bytes)
    }

    fn row_aad() -> String {
        aad(Column::AccessToken, USER, "github")
    }

    #[test]
    fn the_fixed_vector_matches_the_documented_format() {
        assert_eq!(row_aad(), "external_auth_links.access_token:00000000-0000-0000-0000-000000000001:github");
        let keys = keys(&[KEY_A]);
        assert_eq!(keys.primary_id(), Some(KEY_A_ID));
        let nonce: [u8; NONCE_LEN] = std::array::from_fn(|i| i as u8);
        let (sealed, id) = keys.encrypt_with_nonce(TOKEN, &row_aad(), nonce).expect("seal");
        assert_eq!((sealed.as_str(), id.as_str()), (VECTOR, KEY_A_ID));
        assert_eq!(keys.decrypt(VECTOR, KEY_A_ID, &row_aad()).expect("open"), TOKEN);
    }

    #[test]
    fn encryption_round_trips_with_a_fresh_nonce_each_time() {
        let keys = keys(&[KEY_A]);
        let (one, id) = keys.encrypt(TOKEN, &row_aad()).expect("seal");
        let (two, _) = keys.encrypt(TOKEN, &row_aad()).expect("seal");
        assert_ne!(one, two, "a nonce is never reused");
        assert!(!one.contains(TOKEN));
        assert_eq!(keys.decrypt(&one, &id, &row_aad()).expect("open"), TOKEN);
        assert_eq!(keys.decrypt(&two, &id, &row_aad()).expect("open"), TOKEN);
    }

    #[test]
    fn a_ciphertext_copied_to_another_row_or_column_does_not_decrypt() {
        let keys = keys(&[KEY_A]);
        let (sealed, id) = keys.encrypt(TOKEN, &row_aad()).expect("seal");
        for other in [
            aad(Column::AccessToken, Uuid::from_u128(2), "github"),
            aad(Column::AccessToken, USER, "ghe"),
            aad(Column::RefreshToken, USER, "github"),
        ] {
            assert_eq!(
                keys.decrypt(&sealed, &id, &other),
                Err(TokenError::Authentication { key_id: KEY_A_ID.into() }),
                "{other}"
            );
        }
    }

    #[test]
    fn the_first_key_encrypts_and_every_key_decrypts() {
        let b = fresh_key();
        let old = keys(&[&b]);
        let (under_b, b_id) = old.encrypt(TOKEN, &row_aad()).expect("seal");
        let rotated = keys(&[KEY_A, &b]);
        assert_eq!(rotated.primary_id(), Some(KEY_A_ID));
        assert_eq!(rotated.decrypt(&under_b, &b_id, &row_aad()).expect("old key decrypts"), TOKEN);
        let (under_a, a_id) = rotated.encrypt(TOKEN, &row_aad()).expect("seal");
        assert_eq!(a_id, KEY_A_ID);
        assert_eq!(rotated.decrypt(&under_a, &a_id, &row_aad()).expect("open"), TOKEN);
    }

    #[test]
    fn decryption_errors_name_the_problem() {
        let keys = keys(&[KEY_A]);
        match keys.decrypt(VECTOR, "abc1234", &row_aad()) {
            Err(e @ TokenError::UnknownKey { .. }) => {
                let text = e.to_string();
                assert!(text.contains("unknown key id `abc1234`") && text.contains(KEY_A_ID), "{text}");
            }
            other => panic!("expected an unknown key, got {other:?}"),
        }
        assert_eq!(keys.decrypt("not base64!", KEY_A_ID, &row_aad()), Err(TokenError::NotBase64));
        assert_eq!(keys.decrypt("AAEC", KEY_A_ID, &row_aad()), Err(TokenError::TooShort { len: 3 }));
        let mut tampered = STANDARD.decode(VECTOR).expect("b64");
        tampered[20] ^= 1;
        assert_eq!(
            keys.decrypt(&STANDARD.encode(tampered), KEY_A_ID, &row_aad()),
            Err(TokenError::Authentication { key_id: KEY_A_ID.into() })
        );
        let none = TokenKeys::default();
        let err = none.decrypt(VECTOR, KEY_A_ID, &row_aad()).expect_err("no keys");
        assert_eq!(err.to_string(), "encrypted under key 630dcd2 but gitsync.token_keys is empty");
        assert_eq!(none.encrypt(TOKEN, &row_aad()), Err(TokenError::NoKeys));
    }

    #[test]
    fn reveal_refuses_plaintext_only_when_keys_are_configured() {
        assert_eq!(TokenKeys::default().reveal("plain", None, &row_aad()).as_deref(), Ok("plain"));
        assert_eq!(keys(&[KEY_A]).reveal("plain", None, &row_aad()), Err(TokenError::Plaintext));
        assert_eq!(keys(&[KEY_A]).reveal(VECTOR, Some(KEY_A_ID), &row_aad()).as_deref(), Ok(TOKEN));
    }

    #[test]
    fn bad_keys_are_named_by_index_and_never_shown() {
        let good = fresh_key();
        let short = STANDARD.encode([7u8; 16]);
        let cases: [(Vec<&str>, KeyConfigError); 4] = [
            (vec![&good, "not*base64"], KeyConfigError { index: 1, problem: KeyProblem::NotBase64 }),
            (vec![&short], KeyConfigError { index: 0, problem: KeyProblem::WrongLength(16) }),
            (vec![&good, KEY_A, &good], KeyConfigError { index: 2, problem: KeyProblem::Duplicate(0) }),
            (vec![""], KeyConfigError { index: 0, problem: KeyProblem::Empty }),
        ];
        for (entries, want) in cases {
            let secrets: Vec<_> = entries.iter().map(|e| TokenKeySecret::new(*e)).collect();
            let err = TokenKeys::parse(&secrets).expect_err("refused");
            assert_eq!(err, want);
            let text = err.to_string();
            assert!(text.starts_with(&format!("gitsync.token_keys.{}: ", want.index)), "{text}");
            for entry in entries.iter().filter(|e| e.len() > 4) {
                assert!(!text.contains(*entry), "{text}");
            }
        }
    }

    #[test]
    fn debug_output_shows_key_ids_never_keys() {
        let secret = TokenKeySecret::new(KEY_A);
        assert_eq!(format!("{secret:?}"), "TokenKeySecret(***)");
        assert_eq!(secret.redacted(), "*** (key id 630dcd2)");
        assert_eq!(TokenKeySecret::new("x").redacted(), "***");
        let text = format!("{:?}", keys(&[KEY_A]));
        assert_eq!(text, "TokenKeys { ids: [\"630dcd2\"] }");
    }

    #[test]
    fn a_key_list_string_splits_on_commas() {
        let expose = |text| split_key_list(text).iter().map(|k| k.expose().to_owned()).collect::<Vec<_>>();
        assert_eq!(expose(""), Vec::<String>::new());
        assert_eq!(expose("  "), Vec::<String>::new());
        assert_eq!(expose("[]"), Vec::<String>::new());
        assert_eq!(expose("a="), ["a="]);
        assert_eq!(expose("a=, b+/="), ["a=", "b+/="]);
        assert_eq!(expose("[\"a=\", 'b']"), ["a=", "b"]);
        assert_eq!(expose("a,,b"), ["a", "", "b"], "an empty element is kept, and refused by its index");
    }
}
