//! The source side against a scripted target: protocol violations and a link lost while the
//! source waits.
use super::*;

/// 16 MiB of distinct pages in QEMU 10's layout.
fn unique_stream() -> Vec<u8> {
    crate::migration::stream::synthetic::Builder::ram_stream(4096, |i| {
        let mut page = [0x33u8; PAGE_SIZE];
        page[..8].copy_from_slice(&i.to_le_bytes());
        page
    })
}

type TargetRead = tokio::io::ReadHalf<tokio::io::DuplexStream>;
type TargetWrite = tokio::io::WriteHalf<tokio::io::DuplexStream>;

/// Runs the source with `config` on 16 MiB of distinct pages, and answers its HELLO as a target
/// accepting no capability would. Returns the source's task and the target's ends of the link.
async fn greeted(
    config: SourceConfig,
) -> (
    tokio::task::JoinHandle<Result<SourceReport, SourceError>>,
    TargetRead,
    TargetWrite,
    FrameReader,
) {
    use tokio::io::AsyncWriteExt;
    let stream = unique_stream();
    let (mut qemu_w, qemu_r) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let _ = qemu_w.write_all(&stream).await;
    });
    let (source_link, target_link) = tokio::io::duplex(1 << 16);
    let source = tokio::spawn(run_source(
        qemu_r,
        source_link,
        config,
        Arc::new(Counters::default()),
    ));
    let (mut rd, mut wr) = tokio::io::split(target_link);
    let mut frames = FrameReader::new();
    let hello = frames.next(&mut rd).await.unwrap();
    assert!(matches!(hello, Some(LinkFrame::Hello(_))));
    let ack = LinkFrame::HelloAck {
        version: VERSION,
        caps: 0,
    };
    wr.write_all(&ack.to_bytes()).await.unwrap();
    (source, rd, wr, frames)
}

/// Runs the source against a target that greets, takes frames until the source nears its
/// 2 MiB link window (it then waits for an ACK), sends `frame`, and keeps taking frames as
/// a live target would. Returns how the source ended.
async fn source_against(frame: LinkFrame) -> SourceError {
    use tokio::io::AsyncWriteExt;
    let (source, mut rd, mut wr, mut frames) =
        greeted(SourceConfig::new("vm", vec![], "127.0.0.1:1", None)).await;
    let mut received = 0usize;
    while received < 3 << 19 {
        match frames.next(&mut rd).await.unwrap() {
            Some(LinkFrame::Page(_)) => received += PAGE_SIZE,
            Some(_) => {}
            None => panic!("the source closed the link early"),
        }
    }
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = frames.next(&mut rd).await {} });
    tokio::time::sleep(Duration::from_millis(100)).await;
    wr.write_all(&frame.to_bytes()).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), source)
        .await
        .expect("the source stopped waiting for ACKs")
        .unwrap();
    drop(wr);
    drain.abort();
    outcome.expect_err("the session must end with an error")
}

#[tokio::test]
async fn an_ack_beyond_what_was_sent_ends_the_session() {
    let err = source_against(LinkFrame::Ack {
        mapped: 0,
        credit: 1 << 40,
        received: None,
    })
    .await;
    assert!(err.to_string().contains("acknowledged"), "{err}");
}

#[tokio::test]
async fn an_ack_with_a_received_count_nobody_agreed_on_ends_the_session() {
    // The HELLO_ACK above accepted no capability.
    let err = source_against(LinkFrame::Ack {
        mapped: 0,
        credit: 0,
        received: Some(1),
    })
    .await;
    assert!(err.to_string().contains("without CAP_RECEIVED"), "{err}");
}

#[tokio::test]
async fn a_back_channel_failure_ends_a_source_waiting_for_acks() {
    // No page was mapped, so a fallback request is a protocol violation that ends the
    // back channel while the source waits for an ACK that will now never come.
    let err = source_against(LinkFrame::FallbackReq { seq: 999 }).await;
    assert!(err.to_string().contains("unknown page 999"), "{err}");
}

/// With the link paced (the migration's cap), the reader keeps only a few milliseconds of
/// stream ahead of the emitter and waits for it to frame more. If the link is lost then, the
/// emitter stops on the back channel's failure without framing more, and the reader must stop
/// too: a reader left waiting never reads QEMU again, and the source QEMU, blocked writing its
/// final iteration, holds its monitor (seen under load: a migration that never ended).
#[tokio::test]
async fn a_link_lost_while_the_reader_waits_on_a_paced_emitter_ends_the_session() {
    let mut config = SourceConfig::new("vm", vec![], "127.0.0.1:1", None);
    // 1 MB/s: the paced queue is at its floor and a batch takes a quarter of a second.
    config.link_cap = Arc::new(Cap::new(Some(1_000_000)));
    let (source, mut rd, wr, mut frames) = greeted(config).await;
    for _ in 0..8 {
        assert!(frames.next(&mut rd).await.unwrap().is_some());
    }
    // The reader is a paced queue ahead of the emitter by now; the link goes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(rd.unsplit(wr));
    let outcome = tokio::time::timeout(Duration::from_secs(10), source)
        .await
        .expect("the source stopped once the link was lost")
        .unwrap();
    assert!(outcome.is_err(), "a lost link ends the session in error");
}
