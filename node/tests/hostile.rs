//! Hostile peers against a real daemon: a small libp2p swarm in the test speaks `/vmswarm/msg/1`
//! and the chunk lanes (`/vmswarm/chunks/1`) with raw bytes of its choosing.
//!
//! - As a *client* it sends valid requests (answered), a flood of chunk requests on a lane
//!   (answered, never wedging the daemon), messages that are not requests (dropped), garbage,
//!   oversized and truncated frames (refused), then valid requests again: still answered. (libp2p
//!   reports no event for a request-response request that fails to decode, so the daemon cannot ban
//!   such a client; see `daemon::inbound`.) Finally it writes garbage on a lane, and is banned.
//! - As a *server* holding a made-up image it answers the daemon's chunk requests with wrong bytes,
//!   with garbage, or with an oversized frame: each such peer is banned, the pull fails with a clear
//!   message instead of delivering a corrupt image, and the daemon stays responsive.
//!
//! Finally the same daemon pulls a real image from an honest publisher, byte for byte.
//! Rerun with `VMSWARM_TEST_SEED=<seed>` (printed at the start).

mod common;

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use common::raw_codec::RawCodec;
use common::{Node, make_image, publish};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use vmswarm_protocol::bitfield::ChunkBitmap;
use vmswarm_protocol::codec;
use vmswarm_protocol::manifest::Manifest;
use vmswarm_protocol::wire::{Capabilities, Hello, Message};
use vmswarm_protocol::{ChunkId, Priority};

const PROTOCOL: StreamProtocol = StreamProtocol::new("/vmswarm/msg/1");
const LANE: StreamProtocol = StreamProtocol::new("/vmswarm/chunks/1");
type Raw = request_response::Behaviour<RawCodec>;

#[derive(NetworkBehaviour)]
struct Evil {
    rr: Raw,
    lanes: libp2p_stream::Behaviour,
}

fn hostile_swarm() -> Swarm<Evil> {
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| Evil {
            rr: Raw::new(
                [(PROTOCOL, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(20))
                    .with_max_concurrent_streams(1024),
            ),
            lanes: libp2p_stream::Behaviour::new(),
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Runs `fut` while driving the swarm (answering the daemon's Hello on the side).
async fn with_swarm<F: std::future::Future>(swarm: &mut Swarm<Evil>, fut: F) -> F::Output {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            event = swarm.select_next_some() => {
                if let SwarmEvent::Behaviour(EvilEvent::Rr(request_response::Event::Message {
                    message: request_response::Message::Request { channel, .. },
                    ..
                })) = event
                {
                    let _ = swarm.behaviour_mut().rr.send_response(channel, frame(&hello()));
                }
            }
        }
    }
}

/// Reads one frame from a lane and decodes it.
async fn read_lane_frame(stream: &mut libp2p::Stream) -> io::Result<Message> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let mut payload = vec![0u8; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut payload).await?;
    codec::decode(&payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn frame(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    codec::encode_frame(msg, &mut out).unwrap();
    out
}

/// Decodes an answer of the daemon (one frame).
fn unframe(bytes: &[u8]) -> Message {
    assert!(bytes.len() > 4, "short answer: {bytes:?}");
    codec::decode(&bytes[4..]).unwrap()
}

/// Whether a request got an answer (a dropped stream reads as nothing, or fails).
fn answered(a: &Option<Vec<u8>>) -> bool {
    a.as_ref().is_some_and(|b| !b.is_empty())
}

fn hello() -> Message {
    Message::Hello(Hello::new("evil", Capabilities::SERVE, "hostile-test"))
}

/// Dials `addr` and runs the swarm until connected.
async fn connect(swarm: &mut Swarm<Evil>, addr: &str) -> PeerId {
    let addr: Multiaddr = addr.parse().unwrap();
    swarm.dial(addr).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .expect("no connection to the daemon within 20 s");
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = event {
            return peer_id;
        }
    }
}

/// Sends raw requests and collects the answers (`None` where the request failed), serving nothing.
async fn send_all(
    swarm: &mut Swarm<Evil>,
    daemon: PeerId,
    requests: Vec<Vec<u8>>,
) -> Vec<Option<Vec<u8>>> {
    let ids: Vec<OutboundRequestId> = requests
        .into_iter()
        .map(|r| swarm.behaviour_mut().rr.send_request(&daemon, r))
        .collect();
    let mut answers: BTreeMap<OutboundRequestId, Option<Vec<u8>>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answers.len() < ids.len() {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .expect("the daemon neither answered nor refused within 30 s: wedged?");
        match event {
            SwarmEvent::Behaviour(EvilEvent::Rr(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            })) => {
                answers.insert(request_id, Some(response));
            }
            SwarmEvent::Behaviour(EvilEvent::Rr(request_response::Event::OutboundFailure {
                request_id,
                ..
            })) => {
                answers.insert(request_id, None);
            }
            SwarmEvent::Behaviour(EvilEvent::Rr(request_response::Event::Message {
                message: request_response::Message::Request { channel, .. },
                ..
            })) => {
                // The daemon's own requests (Hello): answered, so it treats us as a peer.
                let _ = swarm
                    .behaviour_mut()
                    .rr
                    .send_response(channel, frame(&hello()));
            }
            _ => {}
        }
    }
    ids.iter().map(|id| answers.remove(id).flatten()).collect()
}

/// How a hostile server answers chunk requests.
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// A well-formed chunk message with the right id and length and the wrong bytes.
    WrongBytes,
    /// Bytes that are not a frame.
    Garbage,
    /// A length prefix far over the frame limit.
    Oversized,
}

/// A made-up image: the hostile servers claim to hold it.
struct FakeImage {
    manifest: Manifest,
}

impl FakeImage {
    fn new(rng: &mut ChaCha8Rng) -> FakeImage {
        let chunk = 256 * 1024u32;
        let chunks: Vec<ChunkId> = (0..4)
            .map(|_| {
                let mut data = vec![0u8; chunk as usize];
                rng.fill_bytes(&mut data);
                ChunkId::of(&data)
            })
            .collect();
        let manifest = Manifest::new(
            4 * u64::from(chunk),
            chunk,
            chunks,
            "fake".into(),
            None,
            BTreeMap::new(),
        )
        .unwrap();
        FakeImage { manifest }
    }
}

/// The lie told in answer to a request for chunk `id` of `fake`.
fn lie_for(fake: &Manifest, id: ChunkId, lie: Lie, rng: &mut ChaCha8Rng) -> Vec<u8> {
    match lie {
        Lie::WrongBytes => {
            let index = fake.chunks.iter().position(|c| *c == id).unwrap_or(0) as u32;
            let len = fake.chunk_len(index).unwrap_or(1) as usize;
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            frame(&Message::Chunk { id, data })
        }
        Lie::Garbage => {
            let mut data = vec![0u8; 1000];
            rng.fill_bytes(&mut data);
            data
        }
        Lie::Oversized => {
            let mut data = u32::MAX.to_be_bytes().to_vec();
            data.extend_from_slice(&[0xAB; 64]);
            data
        }
    }
}

/// Answers the chunk requests on one lane the daemon opened with lies.
async fn lie_on_lane(mut stream: libp2p::Stream, fake: Manifest, lie: Lie, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    while let Ok(msg) = read_lane_frame(&mut stream).await {
        let Message::Request { chunks, .. } = msg else {
            continue;
        };
        for id in chunks {
            if stream
                .write_all(&lie_for(&fake, id, lie, &mut rng))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Serves the fake image to the daemon, lying about chunk contents as `lie` says, until `stop`.
async fn serve_lies(
    mut swarm: Swarm<Evil>,
    fake: &FakeImage,
    lie: Lie,
    seed: u64,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut lanes = swarm.behaviour().lanes.new_control().accept(LANE).unwrap();
    let mut lane_seed = seed;
    let image_id = fake.manifest.id();
    let count = fake.manifest.chunk_count();
    loop {
        let event = tokio::select! {
            e = swarm.select_next_some() => e,
            Some((_, stream)) = lanes.next() => {
                lane_seed += 1000;
                tokio::spawn(lie_on_lane(stream, fake.manifest.clone(), lie, lane_seed));
                continue;
            }
            _ = &mut stop => return,
        };
        let SwarmEvent::Behaviour(EvilEvent::Rr(request_response::Event::Message {
            message:
                request_response::Message::Request {
                    request, channel, ..
                },
            ..
        })) = event
        else {
            continue;
        };
        let Ok(msg) = codec::decode(request.get(4..).unwrap_or_default()) else {
            continue;
        };
        let answer = match msg {
            Message::Hello(_) => frame(&hello()),
            Message::GetManifest { image } if image == image_id => frame(&Message::Manifest {
                image,
                bytes: fake.manifest.encode_canonical(),
            }),
            Message::Have { image, .. } => frame(&Message::Have {
                image,
                chunks: ChunkBitmap::full(count).to_wire(),
            }),
            _ => frame(&Message::Ack),
        };
        let _ = swarm.behaviour_mut().rr.send_response(channel, answer);
    }
}

fn banned(status: &Value) -> Vec<String> {
    status["banned"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_until_banned(daemon: &Node, peer: &PeerId) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !banned(&daemon.status()).contains(&peer.to_string()) {
        assert!(
            Instant::now() < deadline,
            "peer {peer} was not banned within 30 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hostile_peers_cannot_crash_or_wedge_a_daemon_and_get_banned() {
    let seed = common::seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::fast_config(tmp.path());
    let cfg = cfg.to_str().unwrap();
    let daemon = Node::start(&tmp.path().join("d"), "dc1", None, &["--config", cfg]);

    // --- A hostile client.
    let mut client = hostile_swarm();
    let client_id = *client.local_peer_id();
    let unknown = ChunkId::of(b"nobody has this");
    let request = |id| {
        frame(&Message::Request {
            priority: Priority::Demand,
            chunks: vec![id],
        })
    };
    let unknown_image = vmswarm_protocol::ImageId([7; 32]);
    let get_manifest = frame(&Message::GetManifest {
        image: unknown_image,
    });
    let d = rt.block_on(connect(&mut client, &daemon.addr));
    rt.block_on(async {
        // Valid control requests are answered, also in a flood of 300 at once.
        let mut valid = vec![frame(&hello())];
        valid.extend((0..300).map(|_| get_manifest.clone()));
        let answers = send_all(&mut client, d, valid).await;
        let unanswered = answers.iter().filter(|a| !answered(a)).count();
        assert_eq!(
            unanswered, 0,
            "{unanswered} of 301 valid requests went unanswered"
        );
        assert_eq!(unframe(answers[0].as_ref().unwrap()).kind(), "hello");
        for a in &answers[1..] {
            let msg = unframe(a.as_ref().unwrap());
            assert!(
                matches!(msg, Message::ManifestNotFound { image } if image == unknown_image),
                "{msg:?}"
            );
        }
        // A flood of 300 chunk requests on a lane: each is answered (NotFound), none wedges it.
        let mut control = client.behaviour().lanes.new_control();
        let mut lane = with_swarm(&mut client, control.open_stream(d, LANE))
            .await
            .expect("opening a lane to the daemon");
        let rejected = with_swarm(&mut client, async {
            for _ in 0..300 {
                lane.write_all(&request(unknown)).await?;
            }
            let mut rejected = 0;
            for _ in 0..300 {
                let msg = read_lane_frame(&mut lane).await?;
                assert!(
                    matches!(msg, Message::Reject { chunk, .. } if chunk == unknown),
                    "{msg:?}"
                );
                rejected += 1;
            }
            io::Result::Ok(rejected)
        })
        .await
        .expect("the lane failed");
        assert_eq!(rejected, 300);
        // A chunk request on request-response, and a frame that is not a request: dropped, not
        // answered.
        let not_requests = send_all(
            &mut client,
            d,
            vec![
                request(unknown),
                frame(&Message::Chunk {
                    id: unknown,
                    data: vec![1; 10],
                }),
            ],
        )
        .await;
        assert!(!not_requests.iter().any(answered), "{not_requests:?}");
        // Then bytes that are not messages: garbage, an oversized prefix, a frame cut short, an
        // empty frame, a chunk head announcing more data than its frame holds.
        let mut garbage = vec![0u8; 500];
        rng.fill_bytes(&mut garbage);
        let mut oversized = u32::MAX.to_be_bytes().to_vec();
        oversized.extend_from_slice(&[0; 100]);
        let mut truncated = 900_000u32.to_be_bytes().to_vec();
        truncated.extend_from_slice(&[7; 100]);
        let mut lying_head = frame(&Message::Chunk {
            id: unknown,
            data: vec![9; 1000],
        });
        let short = (lying_head.len() as u32 - 4 - 500).to_be_bytes();
        lying_head[..4].copy_from_slice(&short);
        lying_head.truncate(lying_head.len() - 500);
        let bad = send_all(
            &mut client,
            d,
            vec![
                garbage.clone(),
                oversized,
                truncated,
                vec![0, 0, 0, 0],
                lying_head,
            ],
        )
        .await;
        assert!(!bad.iter().any(answered), "answered garbage: {bad:?}");
        // Still served, both ways: nothing is wedged.
        let again = send_all(&mut client, d, vec![frame(&hello()), get_manifest.clone()]).await;
        assert!(
            again.iter().all(answered),
            "not answered after the garbage: {again:?}"
        );
        let msg = with_swarm(&mut client, async {
            lane.write_all(&request(unknown)).await?;
            read_lane_frame(&mut lane).await
        })
        .await
        .expect("the lane failed after the garbage");
        assert!(matches!(msg, Message::Reject { .. }), "{msg:?}");
        assert!(
            daemon.status()["peers"]
                .to_string()
                .contains(&client_id.to_string())
        );
        // Garbage on a lane is not lost in libp2p: the daemon bans the sender.
        let mut bad_lane = with_swarm(&mut client, control.open_stream(d, LANE))
            .await
            .expect("opening a second lane");
        with_swarm(&mut client, bad_lane.write_all(&garbage))
            .await
            .expect("writing garbage");
        with_swarm(&mut client, async {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !banned(&daemon.status()).contains(&client_id.to_string()) {
                assert!(
                    Instant::now() < deadline,
                    "a client that wrote garbage on a lane was not banned:\n{}",
                    daemon.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    });
    drop(client);

    // --- Hostile servers: the daemon pulls from them and gets lies.
    let fake = FakeImage::new(&mut rng);
    let image = fake.manifest.id().to_string();
    for (i, lie) in [Lie::WrongBytes, Lie::Garbage, Lie::Oversized]
        .into_iter()
        .enumerate()
    {
        let mut server = hostile_swarm();
        let server_id = *server.local_peer_id();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        rt.block_on(connect(&mut server, &daemon.addr));
        // The daemon's Hello is answered by serve_lies; wait until it counts the liar as a peer.
        let handle = rt.spawn({
            let fake = FakeImage {
                manifest: fake.manifest.clone(),
            };
            async move { serve_lies(server, &fake, lie, seed + i as u64, stop_rx).await }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let peers = daemon.status()["peers"].to_string();
            if peers.contains(&server_id.to_string()) && peers.contains("evil") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "liar never became a peer ({lie:?})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let started = Instant::now();
        let pull = daemon.cli(&["pull", &image]);
        assert!(
            !pull.status.success(),
            "{lie:?}: a pull fed only lies must fail"
        );
        let err = String::from_utf8_lossy(&pull.stderr);
        assert!(err.contains("could not be fetched"), "{lie:?}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{lie:?}: the pull took {:?}",
            started.elapsed()
        );
        wait_until_banned(&daemon, &server_id);
        let _ = stop_tx.send(());
        rt.block_on(handle).unwrap();
    }
    let status = daemon.status();
    assert!(
        status["metrics"]["chunks_corrupt"].as_u64().unwrap_or(0) >= 1,
        "{status}"
    );

    // --- The daemon is neither crashed nor wedged: the same process pulls a real image from an
    // honest node (which joins through it).
    let publisher = Node::start(&tmp.path().join("p"), "dc1", Some(&daemon.addr), &[]);
    let file = tmp.path().join("real.img");
    let data = make_image(&file, 3 * 1024 * 1024 + 5, seed);
    let real = publish(&publisher, &file);
    let out = tmp.path().join("out.img");
    let pull = daemon.cli(&["pull", &real, "-o", out.to_str().unwrap()]);
    assert!(
        pull.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&pull.stderr),
        daemon.log()
    );
    assert!(std::fs::read(&out).unwrap() == data, "pulled image differs");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}
