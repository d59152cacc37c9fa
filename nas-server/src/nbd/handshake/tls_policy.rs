//! The option phase's TLS rules, driven over an in-memory pipe: what each mode answers before
//! and after TLS, and how STARTTLS itself is refused.
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::export::{file::FileExport, Export};

fn exports() -> Exports {
    let path = std::env::temp_dir().join(format!("nas-tls-policy-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let open = |allow: Vec<String>, name: &str| ExportEntry {
        name: name.into(),
        description: String::new(),
        export: Arc::new(FileExport::open(&path, true).unwrap()) as Arc<dyn Export>,
        allow,
    };
    Exports::new(vec![
        open(Vec::new(), "open"),
        open(vec!["source.example".into()], "secret"),
    ])
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn info(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Sends `options` under `session` and returns the reply type of each option's last reply,
/// and how the phase ended.
async fn replies(session: Session, options: &[Vec<u8>]) -> (Vec<u32>, String) {
    let (mut client, mut server) = tokio::io::duplex(1 << 16);
    let exports = exports();
    let phase = tokio::spawn(async move {
        let r = super::options(&mut server, &exports, &session).await;
        // The server's end closes here, so a client waiting for a reply sees the end.
        drop(server);
        r.map(|s| format!("{s:?}"))
            .unwrap_or_else(|e| e.to_string())
    });
    let mut types = Vec::new();
    for o in options {
        client.write_all(o).await.unwrap();
        loop {
            let mut head = [0u8; 20];
            if client.read_exact(&mut head).await.is_err() {
                break;
            }
            let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            client.read_exact(&mut data).await.unwrap();
            if reply != REP_INFO && reply != REP_SERVER {
                types.push(reply);
                break;
            }
        }
    }
    drop(client);
    let ended = phase.await.unwrap();
    (types, ended)
}

fn session(tls: TlsMode, on: bool, who: Option<&str>) -> Session {
    Session {
        no_zeroes: true,
        tls,
        access: Access {
            tls: on,
            identity: who.map(|n| tls_creds::Identity {
                names: vec![n.into()],
            }),
        },
    }
}

#[tokio::test]
async fn tls_modes_answer_each_option_as_the_spec_says() {
    // Off: STARTTLS is not supported; the open export works.
    let (t, _) = replies(
        session(TlsMode::Off, false, None),
        &[option(OPT_STARTTLS, &[]), option(OPT_INFO, &info("open"))],
    )
    .await;
    assert_eq!(t, [REP_ERR_UNSUP, REP_ACK]);
    // Require, before TLS: everything but STARTTLS is TLS_REQD; STARTTLS with data is
    // invalid; a clean STARTTLS ends the phase for the upgrade.
    let (t, ended) = replies(
        session(TlsMode::Require, false, None),
        &[
            option(OPT_LIST, &[]),
            option(OPT_INFO, &info("open")),
            option(OPT_STRUCTURED_REPLY, &[]),
            option(OPT_STARTTLS, b"x"),
            option(OPT_STARTTLS, &[]),
        ],
    )
    .await;
    assert_eq!(
        t,
        [
            REP_ERR_TLS_REQD,
            REP_ERR_TLS_REQD,
            REP_ERR_TLS_REQD,
            REP_ERR_INVALID,
            REP_ACK
        ]
    );
    assert_eq!(ended, "StartTls");
    // ... and EXPORT_NAME, which has no error reply, closes.
    let (_, ended) = replies(
        session(TlsMode::Require, false, None),
        &[option(OPT_EXPORT_NAME, b"open")],
    )
    .await;
    assert!(ended.contains("before TLS"), "{ended}");
    // After TLS: a second STARTTLS is invalid; exports follow the allow-list.
    let (t, _) = replies(
        session(TlsMode::Require, true, Some("stranger.example")),
        &[
            option(OPT_STARTTLS, &[]),
            option(OPT_INFO, &info("open")),
            option(OPT_INFO, &info("secret")),
        ],
    )
    .await;
    assert_eq!(t, [REP_ERR_INVALID, REP_ACK, REP_ERR_POLICY]);
    let (t, _) = replies(
        session(TlsMode::Require, true, Some("source.example")),
        &[option(OPT_INFO, &info("secret"))],
    )
    .await;
    assert_eq!(t, [REP_ACK]);
    // Optional, plaintext: the open export works, the restricted one needs TLS.
    let (t, _) = replies(
        session(TlsMode::Optional, false, None),
        &[
            option(OPT_INFO, &info("open")),
            option(OPT_INFO, &info("secret")),
        ],
    )
    .await;
    assert_eq!(t, [REP_ACK, REP_ERR_TLS_REQD]);
}
