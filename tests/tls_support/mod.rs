//! A throwaway CA and a server certificate for 127.0.0.1 and localhost, written as PEM files, for
//! tests that talk TLS to servers started in the test.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestPki {
    /// A fresh CA (named `ca_name`) and a server certificate it signs.
    pub fn new(ca_name: &str) -> Self {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, ca_name);
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().expect("server key");
        let server_params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
        let server_cert = server_params.signed_by(&server_key, &issuer).expect("server certificate");
        let pki = Self {
            dir: tempfile::tempdir().expect("temp dir"),
            ca_pem: ca_cert.pem(),
            cert_pem: server_cert.pem(),
            key_pem: server_key.serialize_pem(),
        };
        std::fs::write(pki.ca_file(), &pki.ca_pem).expect("write CA");
        std::fs::write(pki.cert_file(), &pki.cert_pem).expect("write certificate");
        std::fs::write(pki.key_file(), &pki.key_pem).expect("write key");
        pki
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}
