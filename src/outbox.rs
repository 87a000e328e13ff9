//! A session's outbox: the bounded queue of frames the driver fills and the session writes,
//! and the signal that ends the session.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};

use crate::protocol::ServerFrame;
use crate::relay::SessionEnd;

/// A session's queue of frames from the driver: bounded, and allocation-free while empty (an
/// idle session costs a few dozen bytes here, where a channel would pre-allocate a block).
#[derive(Debug)]
pub struct FrameQueue {
    frames: Mutex<VecDeque<ServerFrame>>,
    ready: Notify,
    capacity: usize,
    closed: AtomicBool,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds `capacity` frames: the session does not keep up.
    Full,
    /// The session is gone.
    Closed,
}

impl FrameQueue {
    /// An empty queue of at most `capacity` frames.
    pub fn new(capacity: usize) -> FrameQueue {
        FrameQueue {
            frames: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            capacity,
            closed: AtomicBool::new(false),
        }
    }

    /// Queues a frame without waiting.
    ///
    /// # Errors
    /// [`PushError`] when the queue is full or the session gone.
    pub fn push(&self, frame: ServerFrame) -> Result<(), PushError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(PushError::Closed);
        }
        let mut q = self.frames.lock().expect("frame queue lock");
        if q.len() >= self.capacity {
            return Err(PushError::Full);
        }
        q.push_back(frame);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for frames, then moves up to `max` of them into `out`. Cancel-safe: frames move
    /// only in the poll that completes.
    pub async fn pop_batch(&self, out: &mut Vec<ServerFrame>, max: usize) {
        loop {
            {
                let mut q = self.frames.lock().expect("frame queue lock");
                if !q.is_empty() {
                    let n = q.len().min(max);
                    out.extend(q.drain(..n));
                    // Give back what a burst grew, so an idle session stays small.
                    if q.is_empty() && q.capacity() > 64 {
                        q.shrink_to(0);
                    }
                    return;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Marks the session gone: later pushes fail with [`PushError::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// The driver's end of a session: its bounded frame queue and an end signal that works even
/// when the queue is full.
#[derive(Debug)]
pub struct Outbox {
    /// Frames to write.
    pub frames: Arc<FrameQueue>,
    /// End the session.
    pub end: oneshot::Sender<SessionEnd>,
}

impl Outbox {
    /// A new outbox of `capacity` frames, and the session's receiving ends.
    pub fn new(capacity: usize) -> (Outbox, Arc<FrameQueue>, oneshot::Receiver<SessionEnd>) {
        let frames = Arc::new(FrameQueue::new(capacity));
        let (end, end_rx) = oneshot::channel();
        (
            Outbox {
                frames: frames.clone(),
                end,
            },
            frames,
            end_rx,
        )
    }
}
