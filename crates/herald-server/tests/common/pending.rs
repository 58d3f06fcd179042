//! A WebSocket opened without a token (`auth.message_auth`), still waiting to authenticate.

use futures::{SinkExt, StreamExt};
use herald_protocol::ServerEvent;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{EVENT_TIMEOUT, TestServer, handshake};

pub struct Pending {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Pending {
    pub async fn open(server: &TestServer) -> Pending {
        Self::open_request(server.url("/ws").into_client_request().unwrap()).await
    }

    /// Opens from a full request (custom path or headers); the handshake must be accepted.
    pub async fn open_request(request: Request) -> Pending {
        let ws = handshake(request)
            .await
            .expect("pending handshake accepted");
        Pending { ws }
    }

    pub async fn send(&mut self, value: serde_json::Value) {
        self.ws
            .send(WsMessage::text(value.to_string()))
            .await
            .unwrap();
    }

    pub async fn next_event(&mut self) -> ServerEvent {
        loop {
            let message = tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            match message {
                WsMessage::Text(text) => return ServerEvent::decode(&text).unwrap(),
                WsMessage::Close(frame) => panic!("closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// Reads until the Close frame; returns it with the events that came before it.
    pub async fn events_until_close(
        &mut self,
    ) -> (Vec<ServerEvent>, tungstenite::protocol::CloseFrame) {
        let mut events = Vec::new();
        loop {
            let message = tokio::time::timeout(EVENT_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for the close");
            match message {
                Some(Ok(WsMessage::Close(Some(frame)))) => return (events, frame),
                Some(Ok(WsMessage::Text(text))) => events.push(ServerEvent::decode(&text).unwrap()),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    }

    pub async fn expect_close(&mut self) -> tungstenite::protocol::CloseFrame {
        self.events_until_close().await.1
    }
}
