//! The chat UI at `/`. PLACEHOLDER until the UI issue lands: answers 404.

use http::{Method, Response};

use crate::body::Body;
use crate::error::Error;

pub struct Ui;

impl Ui {
    pub fn new(_config: &crate::config::UiConfig) -> Self {
        Self
    }

    pub async fn serve(&self, _method: &Method, path: &str) -> Result<Response<Body>, Error> {
        Err(Error::NotFound(format!("no route for {path}")))
    }
}
