//! The feedback API (`/api/feedback*`). PLACEHOLDER until the feedback issue lands: every route
//! answers 404 so that the proxy core can be built and tested on its own.

use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::error::Error;
use crate::route::Route;

pub struct Feedback;

impl Feedback {
    pub async fn handle(
        &self,
        _route: Route<'_>,
        _req: Request<Incoming>,
    ) -> Result<Response<Body>, Error> {
        Err(Error::NotFound(
            "the feedback API is not available in this build".into(),
        ))
    }
}
