//! The TensorBoard protocol-buffer messages this crate writes, as `prost` structs: the subset
//! of `tensorboard/compat/proto/{event,summary,histogram,tensor,tensor_shape}.proto` (field
//! names and numbers as there) and the text plugin's `TextPluginData`. Fields the writer never
//! sets are left out; decoding skips them as unknown fields.

/// `tensorboard.Event`: one record of an event file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The global step the event belongs to.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// The payload (`oneof what`).
    #[prost(oneof = "event::What", tags = "3, 5, 7")]
    pub what: Option<event::What>,
}

/// The `oneof what` of [`Event`].
pub mod event {
    /// What an [`super::Event`] carries.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        /// `brain.Event:2`, the first event of every file.
        #[prost(string, tag = "3")]
        FileVersion(String),
        /// Summary values (scalars, histograms, text).
        #[prost(message, tag = "5")]
        Summary(super::Summary),
        /// A session marker; `START` makes readers drop data logged at or after its step.
        #[prost(message, tag = "7")]
        SessionLog(super::SessionLog),
    }
}

/// `tensorboard.SessionLog`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionLog {
    /// A [`session_log::Status`].
    #[prost(enumeration = "session_log::Status", tag = "1")]
    pub status: i32,
}

/// The status enum of [`SessionLog`].
pub mod session_log {
    /// `SessionLog.SessionStatus`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Status {
        /// Not set.
        Unspecified = 0,
        /// A (re)started run: TensorBoard purges data at or after this event's step.
        Start = 1,
        /// A stopped run.
        Stop = 2,
        /// A checkpoint was written.
        Checkpoint = 3,
    }
}

/// `tensorboard.Summary`: the values logged at one step.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorboard.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// The tag (`train/loss`, `ppo/policy/ratio`, `args/text_summary`).
    #[prost(string, tag = "1")]
    pub tag: String,
    /// Which plugin reads a tensor value.
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    /// The value (`oneof value`).
    #[prost(oneof = "summary_value::Value", tags = "2, 5, 8")]
    pub value: Option<summary_value::Value>,
}

/// The `oneof value` of [`SummaryValue`].
pub mod summary_value {
    /// A summary value's payload.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// A scalar (`simple_value`, what `SummaryWriter.add_scalar` writes).
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        /// A histogram (`histo`, what `SummaryWriter.add_histogram` writes).
        #[prost(message, tag = "5")]
        Histo(super::HistogramProto),
        /// A tensor read by the plugin named in the metadata (text).
        #[prost(message, tag = "8")]
        Tensor(super::TensorProto),
    }
}

/// `tensorboard.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    /// The plugin that reads the value.
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorboard.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    /// `text`, `scalars`, `histograms`.
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    /// The plugin's own serialized message.
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorboard.HistogramProto`: bucket `i` holds `bucket[i]` values in
/// `(bucket_limit[i-1], bucket_limit[i]]` (the first starts at `min`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistogramProto {
    /// Smallest value.
    #[prost(double, tag = "1")]
    pub min: f64,
    /// Largest value.
    #[prost(double, tag = "2")]
    pub max: f64,
    /// Number of values.
    #[prost(double, tag = "3")]
    pub num: f64,
    /// Sum of the values.
    #[prost(double, tag = "4")]
    pub sum: f64,
    /// Sum of their squares.
    #[prost(double, tag = "5")]
    pub sum_squares: f64,
    /// Right edge of each bucket.
    #[prost(double, repeated, tag = "6")]
    pub bucket_limit: Vec<f64>,
    /// Count of each bucket.
    #[prost(double, repeated, tag = "7")]
    pub bucket: Vec<f64>,
}

/// `tensorboard.TensorProto` (string tensors only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `DataType` (`DT_STRING` = [`DT_STRING`]).
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// The shape.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    /// The strings.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `DataType.DT_STRING` of `types.proto`.
pub const DT_STRING: i32 = 7;

/// `tensorboard.TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    /// The dimensions.
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// `tensorboard.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    /// The size.
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// The text plugin's `TextPluginData` (its only field, `version`, is 0).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TextPluginData {
    /// Format version.
    #[prost(int32, tag = "1")]
    pub version: i32,
}
