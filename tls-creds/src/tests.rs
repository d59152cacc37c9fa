//! Handshakes over in-memory pipes between configurations loaded from generated directories:
//! what connects, and what is refused in the handshake.
use super::*;
use crate::generate::{Ca, Names};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tls-creds-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn write(ca: &Ca, tag: &str, server: &[&str], client: Option<&str>) -> Creds {
    let d = dir(tag);
    ca.write_dir(&d, &Names { server, client }).unwrap();
    Creds::load(&d).unwrap()
}

/// Runs a handshake: the client dials `host` with `client`, the server answers with
/// `server`; the server's view of the client on success.
async fn handshake(
    client: &Creds,
    server: &Creds,
    auth: ClientAuth,
    host: &str,
) -> Result<Option<Identity>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (c, s) = tokio::io::duplex(64 << 10);
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config(auth).unwrap());
    let connector = tokio_rustls::TlsConnector::from(client.client_config().unwrap());
    let name = server_name(host).unwrap();
    let server_side = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
        let peer = Identity::of_peer(tls.get_ref().1.peer_certificates());
        let mut b = [0u8; 5];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let client_side = async {
        let mut tls = connector
            .connect(name, c)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(tls)
    };
    let (client_result, server_result) = tokio::join!(client_side, server_side);
    let peer = server_result.unwrap()?;
    client_result?;
    Ok(peer)
}

#[tokio::test]
async fn mutual_authentication_and_what_it_refuses() {
    let ca = Ca::new("test CA").unwrap();
    let target = write(
        &ca,
        "target",
        &["target.example", "127.0.0.1"],
        Some("target.example"),
    );
    let source = write(&ca, "source", &["source.example"], Some("source.example"));
    // The source dials the target by name or address; the target sees who it is.
    for host in ["target.example", "127.0.0.1"] {
        let peer = handshake(&source, &target, ClientAuth::Required, host)
            .await
            .unwrap();
        let peer = peer.expect("a client certificate");
        assert_eq!(peer.names, ["source.example"]);
        assert!(peer.is_any_of(&["source.example".into()]));
        assert!(!peer.is_any_of(&["other".into()]));
    }
    // The server's certificate does not name the host dialled.
    let e = handshake(&source, &target, ClientAuth::Required, "elsewhere.example")
        .await
        .unwrap_err();
    assert!(e.contains("Certificate") || e.contains("name"), "{e}");
    // A client without a certificate.
    let anonymous = write(&ca, "anonymous", &["anon.example"], None);
    let e = handshake(&anonymous, &target, ClientAuth::Required, "127.0.0.1")
        .await
        .unwrap_err();
    assert!(!e.is_empty());
    // ... is let in where client certificates are optional, with no identity.
    let peer = handshake(&anonymous, &target, ClientAuth::Optional, "127.0.0.1")
        .await
        .unwrap();
    assert_eq!(peer, None);
    // A client whose certificate another CA signed, even with the right CA to trust.
    let other = Ca::new("another CA").unwrap();
    let foreign_dir = dir("foreign");
    other
        .write_dir(
            &foreign_dir,
            &Names {
                server: &["x"],
                client: Some("source.example"),
            },
        )
        .unwrap();
    std::fs::copy(
        target.dir().join("ca-cert.pem"),
        foreign_dir.join("ca-cert.pem"),
    )
    .unwrap();
    let foreign = Creds::load(&foreign_dir).unwrap();
    for auth in [ClientAuth::Required, ClientAuth::Optional] {
        let e = handshake(&foreign, &target, auth, "127.0.0.1")
            .await
            .unwrap_err();
        assert!(!e.is_empty());
    }
}

#[test]
fn missing_files_are_named() {
    let d = dir("missing");
    std::fs::create_dir_all(&d).unwrap();
    let e = Creds::load(&d).unwrap_err().to_string();
    assert!(
        e.contains("ca-cert.pem") && e.contains("tls-creds-x509"),
        "{e}"
    );
    std::fs::write(d.join("ca-cert.pem"), "not PEM").unwrap();
    let e = Creds::load(&d).unwrap_err().to_string();
    assert!(e.contains("ca-cert.pem"), "{e}");
    let ca = Ca::new("ca").unwrap();
    ca.write_dir(
        &d,
        &Names {
            server: &["h"],
            client: None,
        },
    )
    .unwrap();
    std::fs::remove_file(d.join("server-cert.pem")).unwrap();
    let creds = Creds::load(&d).unwrap();
    let e = creds
        .server_config(ClientAuth::Required)
        .unwrap_err()
        .to_string();
    assert!(e.contains("server-cert.pem"), "{e}");
    assert!(server_name("bad name!").is_err());
    assert!(server_name("[::1]").is_ok());
}
