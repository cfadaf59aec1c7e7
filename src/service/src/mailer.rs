//! Outgoing mail over SMTP (lettre), for verification codes, password resets and
//! notification digests.

use std::time::Duration;

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    message::{
        Mailbox, MultiPart,
        header::{ContentType, HeaderName, HeaderValue},
    },
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
        extension::ClientId,
    },
};
use trellis_core::{
    Error, Result,
    config::{EmailConfig, SmtpSecurity},
};

pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// `Ok(None)` when mail is disabled.
    pub fn from_config(cfg: &EmailConfig, server_name: &str) -> Result<Option<Self>, String> {
        if !cfg.enabled {
            return Ok(None);
        }
        let from: Mailbox = cfg.from.parse().map_err(|e| format!("email.from: {e}"))?;
        let tls = |host: &str| -> Result<TlsParameters, String> {
            let mut params = TlsParameters::builder(host.to_owned());
            if !cfg.smtp_ca_file.as_os_str().is_empty() {
                let pem = std::fs::read(&cfg.smtp_ca_file).map_err(|e| {
                    format!("email.smtp_ca_file {}: {e}", cfg.smtp_ca_file.display())
                })?;
                let cert =
                    Certificate::from_pem(&pem).map_err(|e| format!("email.smtp_ca_file: {e}"))?;
                params = params.add_root_certificate(cert);
            }
            params.build_rustls().map_err(|e| format!("email TLS settings: {e}"))
        };
        let builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.smtp_host);
        let builder = match cfg.smtp_security {
            SmtpSecurity::None => builder,
            SmtpSecurity::Starttls => builder.tls(Tls::Required(tls(&cfg.smtp_host)?)),
            SmtpSecurity::Tls => builder.tls(Tls::Wrapper(tls(&cfg.smtp_host)?)),
        };
        let mut builder = builder
            .port(cfg.smtp_port)
            .timeout(Some(Duration::from_secs(15)))
            .hello_name(ClientId::Domain(server_name.to_owned()));
        if !cfg.smtp_username.is_empty() {
            builder = builder.credentials(Credentials::new(
                cfg.smtp_username.clone(),
                cfg.smtp_password.clone(),
            ));
        }
        Ok(Some(Self { transport: builder.build(), from }))
    }

    pub async fn send(&self, to: &str, subject: &str, body: String) -> Result<()> {
        let to: Mailbox = to.parse().map_err(|_| Error::invalid_param("Invalid email address"))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body)
            .map_err(|e| Error::internal("building a mail", e))?;
        self.transport.send(message).await.map_err(|e| Error::internal("sending mail", e))?;
        Ok(())
    }

    /// A mail with plain-text and HTML versions and a one-click unsubscribe link
    /// (RFC 8058: mail clients offer it and POST to it).
    pub async fn send_with_unsubscribe(
        &self,
        to: &str,
        subject: &str,
        plain: String,
        html: String,
        unsubscribe_url: &str,
    ) -> Result<()> {
        let to: Mailbox = to.parse().map_err(|_| Error::invalid_param("Invalid email address"))?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe"),
                format!("<{unsubscribe_url}>"),
            ))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                "List-Unsubscribe=One-Click".to_owned(),
            ))
            .multipart(MultiPart::alternative_plain_html(plain, html))
            .map_err(|e| Error::internal("building a mail", e))?;
        self.transport.send(message).await.map_err(|e| Error::internal("sending mail", e))?;
        Ok(())
    }
}
