// The page's strings in English and Chinese. The chosen language is remembered in
// localStorage; without a choice it follows navigator.language.

const STRINGS = {
  en: {
    tagline: "Video generation",
    signInTitle: "Sign in",
    signInHelp: "Paste the API key you were given (vidmaas up prints one on start).",
    apiKey: "API key",
    signIn: "Sign in",
    signOut: "Sign out",
    keyRequired: "Enter an API key.",
    keyRejected: "This API key was not accepted.",
    serverDown: "The server cannot be reached.",
    newVideo: "New video",
    model: "Model",
    prompt: "Prompt",
    promptPlaceholder: "A red fox running through fresh snow at sunrise…",
    promptRequired: "Describe the video you want.",
    image: "Image",
    optional: "(optional)",
    required: "(required)",
    dropImage: "Drop an image here or click to choose",
    removeImage: "Remove image",
    notAnImage: "Choose a PNG, JPEG or WebP image.",
    size: "Size",
    frames: "Frames",
    steps: "Steps",
    advanced: "Advanced",
    seed: "Seed",
    seedPlaceholder: "random",
    negativePrompt: "Negative prompt",
    generate: "Generate",
    submitting: "Submitting…",
    myTasks: "My tasks",
    noTasks: "No tasks yet. Describe a video and press Generate.",
    loadMore: "Load more",
    cancel: "Cancel",
    download: "Download",
    queuePosition: "#{n} in queue",
    startsIn: "starts in about {n} min",
    eta: "about {t} left",
    live: "Live",
    polling: "Updating every 2 s",
    reconnecting: "Reconnecting…",
    retrying: "Attempt failed ({reason}); retrying",
    failedReason: "Failed: {reason}",
    languageName: "English",
    switchTo: "中文",
    switchLabel: "切换到中文",
    status: {
      queued: "Queued", dispatching: "Starting", running: "Running", cancelling: "Cancelling",
      completed: "Completed", failed: "Failed", cancelled: "Cancelled",
    },
    stage: {
      fetch_input: "Fetching input", load_model: "Loading model", encode_prompt: "Encoding prompt",
      denoise: "Denoising", decode: "Decoding", postprocess: "Post-processing", upload: "Uploading",
    },
  },
  zh: {
    tagline: "视频生成",
    signInTitle: "登录",
    signInHelp: "粘贴分配给你的 API 密钥（vidmaas up 启动时会打印一个）。",
    apiKey: "API 密钥",
    signIn: "登录",
    signOut: "退出登录",
    keyRequired: "请输入 API 密钥。",
    keyRejected: "该 API 密钥无效。",
    serverDown: "无法连接服务器。",
    newVideo: "新建视频",
    model: "模型",
    prompt: "提示词",
    promptPlaceholder: "日出时分，一只红狐狸在新雪中奔跑……",
    promptRequired: "请描述你想要的视频。",
    image: "图片",
    optional: "（可选）",
    required: "（必填）",
    dropImage: "将图片拖到这里，或点击选择",
    removeImage: "移除图片",
    notAnImage: "请选择 PNG、JPEG 或 WebP 图片。",
    size: "分辨率",
    frames: "帧数",
    steps: "步数",
    advanced: "高级选项",
    seed: "随机种子",
    seedPlaceholder: "随机",
    negativePrompt: "反向提示词",
    generate: "生成",
    submitting: "提交中……",
    myTasks: "我的任务",
    noTasks: "还没有任务。描述一个视频，然后点击“生成”。",
    loadMore: "加载更多",
    cancel: "取消",
    download: "下载",
    queuePosition: "排队第 {n} 位",
    startsIn: "约 {n} 分钟后开始",
    eta: "预计还需 {t}",
    live: "实时",
    polling: "每 2 秒刷新",
    reconnecting: "正在重新连接……",
    retrying: "本次尝试失败（{reason}），正在重试",
    failedReason: "失败：{reason}",
    languageName: "中文",
    switchTo: "English",
    switchLabel: "Switch to English",
    status: {
      queued: "排队中", dispatching: "启动中", running: "生成中", cancelling: "取消中",
      completed: "已完成", failed: "失败", cancelled: "已取消",
    },
    stage: {
      fetch_input: "获取输入", load_model: "加载模型", encode_prompt: "编码提示词",
      denoise: "去噪", decode: "解码", postprocess: "后处理", upload: "上传",
    },
  },
};

const KEY = "vidmaas.lang";

export function initialLanguage() {
  const saved = localStorage.getItem(KEY);
  if (saved === "en" || saved === "zh") return saved;
  const langs = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
  return String(langs[0]).toLowerCase().startsWith("zh") ? "zh" : "en";
}

export function saveLanguage(lang) {
  localStorage.setItem(KEY, lang);
}

export function translator(lang) {
  const table = STRINGS[lang] || STRINGS.en;
  return (key, vars) => {
    let value = key.split(".").reduce((o, k) => (o == null ? undefined : o[k]), table);
    if (value === undefined) value = key.split(".").reduce((o, k) => (o == null ? undefined : o[k]), STRINGS.en);
    if (value === undefined) return key.split(".").pop();
    return String(value).replace(/\{(\w+)\}/g, (_, name) => (vars && name in vars ? String(vars[name]) : ""));
  };
}
