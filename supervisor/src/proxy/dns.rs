//! The DNS stub for transparent mode: answers every `A` query from the guest
//! with one fixed address (the proxy's side of the tap link), so tools that
//! ignore `HTTPS_PROXY` still connect somewhere nftables can redirect.
//!
//! **Invariant:** the stub forwards nothing upstream and reveals nothing
//! about real names: the answer depends only on the query type. `AAAA` and
//! every other type get NOERROR with no answer (NODATA); non-IN classes get
//! REFUSED; responses and unparseable packets are dropped. Reaching a name
//! still needs a lease: the proxy decides that, not the stub.
//!
//! Parsing and rendering are pure ([`answer`]); [`run_udp`] and [`run_tcp`]
//! are the socket loops.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the stub answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsStubConfig {
    /// The address every `A` query gets.
    pub answer: Ipv4Addr,
    /// TTL of that answer, in seconds.
    pub ttl: u32,
}

/// Time a TCP client gets for each message.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries served over one TCP connection.
const TCP_MAX_QUERIES: usize = 64;
/// TCP connections served at once; further ones wait in the backlog.
const TCP_MAX_CONNECTIONS: usize = 32;

/// The response to one query packet, or `None` to drop it.
pub fn answer(packet: &[u8], config: &DnsStubConfig) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    if query.metadata.message_type != MessageType::Query {
        return None;
    }
    let id = query.metadata.id;
    let op_code = query.metadata.op_code;
    let mut resp = Message::response(id, op_code);
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.authoritative = true;
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        resp.edns = Some(edns);
    }
    if op_code != OpCode::Query {
        resp.metadata.response_code = ResponseCode::NotImp;
        return resp.to_vec().ok();
    }
    let [q] = query.queries.as_slice() else {
        resp.metadata.response_code = ResponseCode::FormErr;
        return resp.to_vec().ok();
    };
    resp.add_query(q.clone());
    if q.query_class() != DNSClass::IN {
        resp.metadata.response_code = ResponseCode::Refused;
    } else if q.query_type() == RecordType::A {
        resp.add_answer(Record::from_rdata(
            q.name().clone(),
            config.ttl,
            RData::A(A(config.answer)),
        ));
    }
    // Everything else: NOERROR with no answer (NODATA).
    resp.to_vec().ok()
}

/// Serves queries on `socket` until `shutdown`. Garbage is dropped.
pub async fn run_udp(socket: UdpSocket, config: DnsStubConfig, shutdown: CancellationToken) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dns stub recv failed");
                    continue;
                }
            },
        };
        // A response holds one question (a name of at most 255 bytes), at
        // most one A record with a compressed name, and maybe an OPT record:
        // always below the 512 bytes plain UDP allows, so no truncation.
        if let Some(resp) = answer(&buf[..n], &config) {
            let _ = socket.send_to(&resp, peer).await;
        }
    }
}

/// Serves length-prefixed queries over TCP until `shutdown`.
pub async fn run_tcp(listener: TcpListener, config: DnsStubConfig, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(TCP_MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = serve_tcp(stream, config) => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn serve_tcp(mut stream: TcpStream, config: DnsStubConfig) {
    for _ in 0..TCP_MAX_QUERIES {
        let mut len = [0u8; 2];
        let read = async {
            stream.read_exact(&mut len).await?;
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut msg).await?;
            Ok::<_, std::io::Error>(msg)
        };
        let Ok(Ok(msg)) = tokio::time::timeout(TCP_TIMEOUT, read).await else {
            return;
        };
        let Some(resp) = answer(&msg, &config) else {
            return;
        };
        let Ok(n) = u16::try_from(resp.len()) else {
            return;
        };
        let mut out = n.to_be_bytes().to_vec();
        out.extend_from_slice(&resp);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    const CFG: DnsStubConfig = DnsStubConfig {
        answer: Ipv4Addr::new(10, 200, 0, 1),
        ttl: 5,
    };

    fn query(name: &str, ty: RecordType, class: DNSClass) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        let mut q = Query::query(Name::from_ascii(name).unwrap(), ty);
        q.set_query_class(class);
        m.add_query(q);
        m.to_vec().unwrap()
    }

    fn parse(bytes: Option<Vec<u8>>) -> Message {
        Message::from_vec(&bytes.expect("a response")).unwrap()
    }

    #[test]
    fn a_queries_get_the_fixed_address() {
        let r = parse(answer(
            &query("api.github.com.", RecordType::A, DNSClass::IN),
            &CFG,
        ));
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(CFG.answer)));
        assert_eq!(r.answers[0].ttl, 5);
        assert_eq!(r.queries.len(), 1);
        // The longest possible name still fits plain UDP.
        let long = format!("{0}.{0}.{0}.{1}.", "a".repeat(63), "b".repeat(61));
        let r = answer(&query(&long, RecordType::A, DNSClass::IN), &CFG).unwrap();
        assert!(r.len() <= 512, "{}", r.len());
    }

    #[test]
    fn other_types_get_nodata_and_other_classes_refused() {
        for ty in [
            RecordType::AAAA,
            RecordType::MX,
            RecordType::TXT,
            RecordType::HTTPS,
        ] {
            let r = parse(answer(&query("a.example.", ty, DNSClass::IN), &CFG));
            assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{ty}");
            assert!(r.answers.is_empty(), "{ty}");
        }
        let r = parse(answer(
            &query("a.example.", RecordType::A, DNSClass::CH),
            &CFG,
        ));
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn garbage_responses_and_odd_opcodes() {
        for junk in [&b""[..], b"\x00", b"\x12\x34\x01\x00\x00\x01", &[0xff; 600]] {
            assert!(answer(junk, &CFG).is_none(), "{junk:?}");
        }
        // A response is never answered (no loops).
        let mut resp = Message::response(7, OpCode::Query);
        resp.add_query(Query::query(
            Name::from_ascii("a.example.").unwrap(),
            RecordType::A,
        ));
        assert!(answer(&resp.to_vec().unwrap(), &CFG).is_none());
        // Two questions: FORMERR.
        let mut two = Message::new(8, MessageType::Query, OpCode::Query);
        two.add_query(Query::query(
            Name::from_ascii("a.example.").unwrap(),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_ascii("b.example.").unwrap(),
            RecordType::A,
        ));
        let r = parse(answer(&two.to_vec().unwrap(), &CFG));
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        // No question: FORMERR.
        let none = Message::new(9, MessageType::Query, OpCode::Query);
        let r = parse(answer(&none.to_vec().unwrap(), &CFG));
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        // An update: NOTIMP.
        let mut upd = Message::new(10, MessageType::Query, OpCode::Update);
        upd.add_query(Query::query(
            Name::from_ascii("a.example.").unwrap(),
            RecordType::SOA,
        ));
        let r = parse(answer(&upd.to_vec().unwrap(), &CFG));
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    }

    #[test]
    fn truncated_and_mutated_queries_never_panic() {
        let q = query("api.github.com.", RecordType::A, DNSClass::IN);
        for cut in 0..q.len() {
            let _ = answer(&q[..cut], &CFG);
        }
        for i in 0..q.len() {
            for b in [0u8, 0xff, 0xc0, 0x3f] {
                let mut m = q.clone();
                m[i] = b;
                let _ = answer(&m, &CFG);
            }
        }
    }

    #[tokio::test]
    async fn udp_and_tcp_servers_answer_over_loopback() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let u = tokio::spawn(run_udp(udp, CFG, shutdown.clone()));
        let t = tokio::spawn(run_tcp(tcp, CFG, shutdown.clone()));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"garbage", udp_addr).await.unwrap();
        client
            .send_to(&query("git.test.", RecordType::A, DNSClass::IN), udp_addr)
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(r.answers[0].data, RData::A(A(CFG.answer)));

        let mut s = TcpStream::connect(tcp_addr).await.unwrap();
        let q = query("git.test.", RecordType::AAAA, DNSClass::IN);
        s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&q).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut msg).await.unwrap();
        let r = Message::from_vec(&msg).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());

        shutdown.cancel();
        u.await.unwrap();
        t.await.unwrap();
    }
}
