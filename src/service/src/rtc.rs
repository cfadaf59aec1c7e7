//! MatrixRTC plumbing for group calls (Element Call, Element X): where the SFU is
//! (MSC4143 transports and the `rtc_foci` of `.well-known`), and the LiveKit access
//! tokens that let a member into a call's SFU room, issued here so that no separate
//! lk-jwt-service is needed. Tokens follow LiveKit's format (an HS256 JWT whose issuer
//! is the API key, with a `video` grant); room names and identities are derived the way
//! lk-jwt-service and matrix-js-sdk derive them, since clients map encryption keys to
//! participants by those identities.

use std::sync::Arc;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use trellis_core::{Error, ErrorKind, Result, config::RtcConfig, error::code, now_millis};

use crate::{
    Services,
    call_leaves::{CallLeaves, SfuSeat},
};

/// The slot of a room's own call, which the legacy `/sfu/get` always means.
pub const ROOM_CALL_SLOT: &str = "m.call#ROOM";

/// The path under which this server answers what lk-jwt-service answers elsewhere
/// (`/sfu/get`, `/get_token`); advertised as the focus's `livekit_service_url`.
pub const JWT_SERVICE_PATH: &str = "/_trellis/livekit";

/// The transports (foci) clients are told about: the configured LiveKit SFU, reached
/// through this server's token service. Empty without one.
pub fn transports(services: &Services) -> Vec<Value> {
    if services.config.rtc.livekit_url.is_empty() {
        return Vec::new();
    }
    let service_url = format!("{}{JWT_SERVICE_PATH}", services.public_base_url());
    vec![json!({ "type": "livekit", "livekit_service_url": service_url })]
}

/// Unpadded standard base64 of the SHA-256 of `parts` as a JSON array.
fn hashed(parts: &[&str]) -> String {
    let json = serde_json::to_vec(parts).unwrap_or_default();
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(json))
}

/// The LiveKit room of a Matrix room's call slot.
pub fn room_alias(room_id: &str, slot_id: &str) -> String {
    hashed(&[room_id, slot_id])
}

/// A call member's LiveKit identity (MSC4195): derived from user, device and member id.
pub fn member_identity(user_id: &str, device_id: &str, member_id: &str) -> String {
    hashed(&[user_id, device_id, member_id])
}

/// LiveKit reads an absent `canPublish`/`canSubscribe`/`canPublishData` as allowed.
fn allowed() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize)]
struct VideoGrant {
    #[serde(rename = "roomJoin", default)]
    room_join: bool,
    #[serde(rename = "roomCreate", default)]
    room_create: bool,
    #[serde(default)]
    room: String,
    #[serde(rename = "canPublish", default = "allowed")]
    can_publish: bool,
    #[serde(rename = "canSubscribe", default = "allowed")]
    can_subscribe: bool,
    #[serde(rename = "canPublishData", default = "allowed")]
    can_publish_data: bool,
    #[serde(rename = "canUpdateOwnMetadata", default)]
    can_update_own_metadata: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(default)]
    iat: u64,
    #[serde(default)]
    nbf: u64,
    exp: u64,
    #[serde(default)]
    name: String,
    video: VideoGrant,
}

/// Who gets a token, for which LiveKit room.
pub struct Grant<'a> {
    pub identity: String,
    pub room: String,
    /// The Matrix user, shown as the participant's name.
    pub user_id: &'a str,
    /// Only the token that creates the call's room on the SFU has this; members'
    /// tokens never do (see [`create_sfu_room`]).
    pub may_create: bool,
}

/// A LiveKit access token for `grant`.
pub fn access_token(config: &RtcConfig, grant: &Grant<'_>) -> Result<String> {
    let now = now_millis() / 1000;
    let claims = Claims {
        iss: config.livekit_api_key.clone(),
        sub: grant.identity.clone(),
        iat: now,
        nbf: now,
        exp: now.saturating_add(config.token_lifetime_seconds),
        name: grant.user_id.to_owned(),
        video: VideoGrant {
            room_join: true,
            room_create: grant.may_create,
            room: grant.room.clone(),
            can_publish: true,
            can_subscribe: true,
            can_publish_data: true,
            can_update_own_metadata: true,
        },
    };
    let key = jsonwebtoken::EncodingKey::from_secret(config.livekit_api_secret.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)
        .map_err(|e| Error::internal("signing a LiveKit token", e))
}

/// What a LiveKit token signed with this server's SFU secret allows (the built-in SFU
/// checks the tokens it is handed with this).
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub identity: String,
    pub name: String,
    pub room: String,
    pub room_join: bool,
    pub room_create: bool,
    pub can_publish: bool,
    pub can_subscribe: bool,
    pub can_publish_data: bool,
    pub can_update_metadata: bool,
}

/// Checks a LiveKit access token: signed with the API secret, issued by the API key, in
/// its validity window.
pub fn verify_token(config: &RtcConfig, jwt: &str) -> Result<VerifiedToken> {
    let key = jsonwebtoken::DecodingKey::from_secret(config.livekit_api_secret.as_bytes());
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&[config.livekit_api_key.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "sub"]);
    validation.validate_nbf = true;
    let claims =
        jsonwebtoken::decode::<Claims>(jwt, &key, &validation).map_err(|_| unauthorised())?.claims;
    Ok(VerifiedToken {
        identity: claims.sub,
        name: claims.name,
        room: claims.video.room,
        room_join: claims.video.room_join,
        room_create: claims.video.room_create,
        can_publish: claims.video.can_publish,
        can_subscribe: claims.video.can_subscribe,
        can_publish_data: claims.video.can_publish_data,
        can_update_metadata: claims.video.can_update_own_metadata,
    })
}

fn configured(services: &Services) -> Result<&RtcConfig> {
    let config = &services.config.rtc;
    if config.livekit_url.is_empty() {
        return Err(Error::unrecognized("No MatrixRTC SFU is configured on this server"));
    }
    Ok(config)
}

fn unauthorised() -> Error {
    Error::new(
        ErrorKind::Unauthenticated,
        code::UNAUTHORIZED,
        "The request could not be authorised",
    )
}

/// An OpenID token as a client hands it over (`POST /user/{userId}/openid/request_token`).
#[derive(Debug, Deserialize)]
pub struct OpenIdToken {
    pub access_token: String,
    pub matrix_server_name: String,
}

/// The user an OpenID token stands for: looked up here for this server's tokens,
/// asked of the issuing server for others'.
async fn openid_user(services: &Services, token: &OpenIdToken) -> Result<String> {
    if token.matrix_server_name == services.server_name() {
        let owner =
            services.accounts.openid_owner(&token.access_token)?.ok_or_else(unauthorised)?;
        return Ok(format!("@{owner}:{}", services.server_name()));
    }
    if ruma::ServerName::parse(&token.matrix_server_name).is_err() {
        return Err(unauthorised());
    }
    let user = services
        .federation
        .remote_openid_user(&token.matrix_server_name, &token.access_token)
        .await
        .map_err(|e| {
            tracing::info!(server = %token.matrix_server_name, error = %e, "OpenID token refused");
            unauthorised()
        })?;
    // The issuing server vouches only for its own users.
    match ruma::UserId::parse(user.as_str()) {
        Ok(id) if id.server_name().as_str() == token.matrix_server_name => Ok(user),
        _ => Err(unauthorised()),
    }
}

/// Tokens are for members of the room, as this server sees it: a user who knows a room's
/// id gets nothing of its call otherwise.
fn require_member(services: &Services, room_id: &str, user_id: &str) -> Result<()> {
    match services.rooms.membership(room_id, user_id)? {
        Some(ruma::events::room::member::MembershipState::Join) => Ok(()),
        _ => Err(Error::forbidden("You are not a member of this room")),
    }
}

fn full_access(services: &Services, user_id: &str) -> bool {
    let server = user_id.split_once(':').map_or("", |(_, server)| server);
    server == services.server_name()
        || services.config.rtc.full_access_servers.iter().any(|s| s == server || s == "*")
}

/// A token and the SFU it is for: what `/sfu/get` and `/get_token` answer.
pub struct SfuAccess {
    pub url: String,
    pub jwt: String,
}

/// The legacy exchange (`POST /sfu/get`): an OpenID token for access to `room`'s call.
pub async fn legacy_token(
    services: &Arc<Services>,
    room: &str,
    token: &OpenIdToken,
    device_id: &str,
    delay_id: Option<&str>,
) -> Result<SfuAccess> {
    let config = configured(services)?;
    if ruma::RoomId::parse(room).is_err() || device_id.is_empty() {
        return Err(Error::bad_json("`room` must be a room id and `device_id` is required"));
    }
    let user = openid_user(services, token).await?;
    require_member(services, room, &user)?;
    let seat =
        SfuSeat { room: room_alias(room, ROOM_CALL_SLOT), identity: format!("{user}:{device_id}") };
    grant_with_hand_over(services, config, &user, room, seat, delay_id).await
}

/// The token for `user` to take `seat` in `room_id`'s call (whose SFU room is made
/// first for users who may start calls), its leave `delay_id` handed over first when
/// given. Any refusal of the hand-over is `M_BAD_JSON`, on which clients ask again
/// without, as lk-jwt-service answers.
async fn grant_with_hand_over(
    services: &Arc<Services>,
    config: &RtcConfig,
    user: &str,
    room_id: &str,
    seat: SfuSeat,
    delay_id: Option<&str>,
) -> Result<SfuAccess> {
    if let Some(delay_id) = delay_id.filter(|id| !id.is_empty()) {
        let handed_over = async {
            let local = local_user(services, user)?;
            CallLeaves::delegate(services, &local, room_id, seat.clone(), delay_id).await
        };
        handed_over.await.map_err(|e| {
            Error::bad_json(format!("The delayed leave is not taken over: {}", e.message))
        })?;
    }
    services.call_history.note_sfu_room(&seat.room, room_id);
    if full_access(services, user) {
        create_sfu_room(config, &seat.room).await;
    }
    let grant =
        Grant { identity: seat.identity, room: seat.room, user_id: user, may_create: false };
    Ok(SfuAccess { url: config.livekit_url.clone(), jwt: access_token(config, &grant)? })
}

/// The member a `/get_token` request claims to be.
#[derive(Debug, Deserialize)]
pub struct ClaimedMember {
    pub id: String,
    pub claimed_user_id: String,
    pub claimed_device_id: String,
}

/// The MSC4195 exchange (`POST /get_token`): an OpenID token for a call slot.
pub async fn slot_token(
    services: &Arc<Services>,
    room_id: &str,
    slot_id: &str,
    token: &OpenIdToken,
    member: &ClaimedMember,
    delay_id: Option<&str>,
) -> Result<SfuAccess> {
    let config = configured(services)?;
    if ruma::RoomId::parse(room_id).is_err() || slot_id.is_empty() || member.id.is_empty() {
        return Err(Error::bad_json("`room_id`, `slot_id` and `member.id` are required"));
    }
    let user = openid_user(services, token).await?;
    if user != member.claimed_user_id {
        return Err(unauthorised());
    }
    require_member(services, room_id, &user)?;
    let seat = SfuSeat {
        room: room_alias(room_id, slot_id),
        identity: member_identity(&user, &member.claimed_device_id, &member.id),
    };
    grant_with_hand_over(services, config, &user, room_id, seat, delay_id).await
}

/// Where leaves cannot be handed over (no built-in SFU) the hand-over endpoints answer
/// 404 `M_UNRECOGNIZED` before anything else: clients probe them with an empty request
/// and take any other answer to mean the hand-over is offered.
pub fn hand_over_offered(services: &Services) -> Result<()> {
    if services.call_leaves.offered() {
        return Ok(());
    }
    Err(Error::unrecognized("Delayed leaves are not taken over by this server"))
}

/// `user` as one of this server's users: only their delayed events are here to take over.
fn local_user(services: &Services, user: &str) -> Result<ruma::OwnedUserId> {
    ruma::UserId::parse(user).ok().filter(|u| u.server_name() == services.server_name()).ok_or_else(
        || Error::bad_json("Only this server's users may hand their delayed leave over to it"),
    )
}

/// The MSC4195 hand-over as lk-jwt-service serves it (`POST /delegate_delayed_leave`,
/// with an OpenID token): `delay_id` is sent when the member leaves the call.
pub async fn delegate_leave_with_openid(
    services: &Arc<Services>,
    room_id: &str,
    slot_id: &str,
    token: &OpenIdToken,
    member: &ClaimedMember,
    delay_id: &str,
) -> Result<()> {
    configured(services)?;
    if ruma::RoomId::parse(room_id).is_err() || slot_id.is_empty() || member.id.is_empty() {
        return Err(Error::bad_json("`room_id`, `slot_id` and `member.id` are required"));
    }
    if delay_id.is_empty() {
        return Err(Error::bad_json("`delay_id` is required"));
    }
    // Only this server's users can succeed: others are refused before their server is
    // asked about the token.
    if token.matrix_server_name != services.server_name() {
        return Err(Error::forbidden("Only this server's users may hand their delayed leave over"));
    }
    let user = openid_user(services, token).await?;
    if user != member.claimed_user_id {
        return Err(unauthorised());
    }
    let user = local_user(services, &user).map_err(|e| Error::forbidden(e.message))?;
    require_member(services, room_id, user.as_str())?;
    let seat = SfuSeat {
        room: room_alias(room_id, slot_id),
        identity: member_identity(user.as_str(), &member.claimed_device_id, &member.id),
    };
    CallLeaves::delegate(services, &user, room_id, seat, delay_id).await
}

/// Makes sure the call's room exists on the SFU before a member of this server (or of a
/// full-access server) joins, as lk-jwt-service does: with LiveKit's `room.auto_create`
/// off, only rooms made this way exist, so users of other servers join calls but cannot
/// start them. A failure is logged, not fatal: with `auto_create` on (LiveKit's
/// default) the join creates the room anyway.
async fn create_sfu_room(config: &RtcConfig, room: &str) {
    static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap_or_default()
    });
    let creator =
        Grant { identity: "trellis".into(), room: room.to_owned(), user_id: "", may_create: true };
    let token = match access_token(config, &creator) {
        Ok(token) => token,
        Err(e) => {
            tracing::warn!(error = %e, "cannot sign the SFU room creation");
            return;
        }
    };
    // The SFU's HTTP API lives at the same address as its WebSocket.
    let base = config
        .livekit_url
        .trim_end_matches('/')
        .replacen("wss://", "https://", 1)
        .replacen("ws://", "http://", 1);
    let body = json!({ "name": room, "empty_timeout": 300, "departure_timeout": 20 });
    let sent = CLIENT
        .post(format!("{base}/twirp/livekit.RoomService/CreateRoom"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => {}
        Ok(resp) => {
            tracing::warn!(status = %resp.status(), "the SFU refused to create a call's room")
        }
        Err(e) => {
            tracing::warn!(error = %e, "the SFU could not be reached to create a call's room")
        }
    }
}

/// A member of a call slot as the homeserver forms of MSC4195 name it: the caller (with
/// an access token), the room and slot, its member id, and the SFU it means.
pub struct SlotMember<'a> {
    pub user: &'a ruma::UserId,
    pub device_id: &'a str,
    pub room_id: &'a ruma::RoomId,
    pub slot_id: &'a str,
    pub member_id: &'a str,
    pub sfu_url: &'a str,
}

impl SlotMember<'_> {
    /// Checks that it means this server's SFU and is in the room; answers its seat.
    fn seat(&self, config: &RtcConfig, services: &Services) -> Result<SfuSeat> {
        if self.slot_id.is_empty() || self.member_id.is_empty() {
            return Err(Error::bad_json("`slot_id` and `member_id` are required"));
        }
        if self.sfu_url.trim_end_matches('/') != config.livekit_url.trim_end_matches('/') {
            return Err(Error::invalid_param("This server serves only its own SFU"));
        }
        require_member(services, self.room_id.as_str(), self.user.as_str())?;
        Ok(SfuSeat {
            room: room_alias(self.room_id.as_str(), self.slot_id),
            identity: member_identity(self.user.as_str(), self.device_id, self.member_id),
        })
    }
}

/// The homeserver form of MSC4195 (`POST /rtc/livekit/get_token` with an access token):
/// the caller, joined to the room, gets a token for the slot.
pub async fn member_token(services: &Services, member: &SlotMember<'_>) -> Result<String> {
    let config = configured(services)?;
    let seat = member.seat(config, services)?;
    services.call_history.note_sfu_room(&seat.room, member.room_id.as_str());
    create_sfu_room(config, &seat.room).await;
    let grant = Grant {
        identity: seat.identity,
        room: seat.room,
        user_id: member.user.as_str(),
        may_create: false,
    };
    access_token(config, &grant)
}

/// The homeserver form of the MSC4195 hand-over (`POST /rtc/livekit/delegate_delayed_leave`
/// with an access token): the caller's `delay_id` is sent when its member leaves the call.
pub async fn delegate_leave(
    services: &Arc<Services>,
    member: &SlotMember<'_>,
    delay_id: &str,
) -> Result<()> {
    let seat = member.seat(configured(services)?, services)?;
    CallLeaves::delegate(services, member.user, member.room_id.as_str(), seat, delay_id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_identities_match_the_msc_test_vectors() {
        assert_eq!(
            room_alias("!roomid:example.com", "slot1234"),
            "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"
        );
        assert_eq!(
            member_identity("@alice:example.com", "DEVICE123", "memberABC"),
            "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"
        );
    }

    #[test]
    fn a_token_carries_the_grant_signed_with_the_secret() {
        let config = RtcConfig {
            livekit_url: "wss://sfu.example.org".into(),
            livekit_api_key: "key".into(),
            livekit_api_secret: "secret".into(),
            ..RtcConfig::default()
        };
        let grant = Grant {
            identity: "@a:x:DEV".into(),
            room: "room".into(),
            user_id: "@a:x",
            may_create: false,
        };
        let jwt = access_token(&config, &grant).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&["key"]);
        let key = jsonwebtoken::DecodingKey::from_secret(b"secret");
        let claims = jsonwebtoken::decode::<Claims>(&jwt, &key, &validation).unwrap().claims;
        assert_eq!(claims.sub, "@a:x:DEV");
        assert_eq!(claims.video.room, "room");
        assert!(claims.video.room_join && !claims.video.room_create);
        assert_eq!(claims.exp - claims.nbf, 3600);
        let wrong = jsonwebtoken::DecodingKey::from_secret(b"other");
        assert!(jsonwebtoken::decode::<Claims>(&jwt, &wrong, &validation).is_err());
    }
}
