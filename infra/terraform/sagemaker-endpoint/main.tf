# SageMaker embedding endpoint: execution role (least privilege), model, endpoint config
# (serverless or real-time) and endpoint. See README.md.

data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}

locals {
  # The Hugging Face PyTorch inference DLC: its GPU build on GPU instances, else the CPU build.
  gpu       = !var.serverless && contains(["g4dn", "g5", "g6", "g6e", "p3", "p4d", "p4de", "p5"], split(".", var.instance_type)[1])
  dlc_tag   = local.gpu ? "2.6.0-transformers4.49.0-gpu-py312-cu124-ubuntu22.04" : "2.6.0-transformers4.49.0-cpu-py312-ubuntu22.04"
  dlc_image = "763104351884.dkr.ecr.${var.aws_region}.amazonaws.com/huggingface-pytorch-inference:${local.dlc_tag}"
  image     = coalesce(var.image_uri, local.dlc_image)

  # <account>.dkr.ecr.<region>.amazonaws.com/<repository>[:tag|@digest] -> the repository's ARN.
  image_parts    = regex("^([0-9]{12})\\.dkr\\.ecr\\.([a-z0-9-]+)\\.amazonaws\\.com(?:\\.cn)?/([^:@]+)", local.image)
  repository_arn = "arn:${data.aws_partition.current.partition}:ecr:${local.image_parts[1]}:${local.image_parts[0]}:repository/${local.image_parts[2]}"

  # s3://bucket/key.tar.gz -> arn:aws:s3:::bucket/key.tar.gz
  model_object_arn = var.model_data_url == null ? null : "arn:${data.aws_partition.current.partition}:s3:::${trimprefix(var.model_data_url, "s3://")}"

  environment = merge(
    { HF_TASK = var.hf_task, SAGEMAKER_REGION = var.aws_region },
    var.model_data_url == null ? { HF_MODEL_ID = var.model_id } : {},
    var.environment,
  )

  create_role = var.role_arn == null
  role_arn    = local.create_role ? aws_iam_role.this[0].arn : var.role_arn

  # Model and config names carry a hash of what they hold: a change creates new ones before the
  # endpoint switches to them (create_before_destroy), so updates do not take the endpoint down.
  model_hash = substr(sha1(jsonencode({
    image = local.image, env = local.environment, data = var.model_data_url, role = local.role_arn
  })), 0, 8)
  config_hash = substr(sha1(jsonencode({
    model      = local.model_hash, serverless = var.serverless, memory = var.memory_size_mb,
    concurrent = var.max_concurrency, type = var.instance_type, count = var.instance_count
  })), 0, 8)
}

# ---------------------------------------------------------------- IAM role

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["sagemaker.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  count              = local.create_role ? 1 : 0
  name               = "${var.name}-sagemaker"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = var.tags
}

# Exactly what hosting needs: pull the image, read the model archive, write its logs and metrics.
data "aws_iam_policy_document" "serve" {
  statement {
    sid       = "EcrAuth"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"] # this action has no resource-level permissions
  }
  statement {
    sid       = "EcrPull"
    actions   = ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"]
    resources = [local.repository_arn]
  }
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["arn:${data.aws_partition.current.partition}:logs:${var.aws_region}:${data.aws_caller_identity.current.account_id}:log-group:/aws/sagemaker/Endpoints/${var.name}*"]
  }
  statement {
    sid       = "Metrics"
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"] # scoped by namespace below; PutMetricData has no resource-level permissions
    condition {
      test     = "StringLike"
      variable = "cloudwatch:namespace"
      values   = ["/aws/sagemaker/*"]
    }
  }
  dynamic "statement" {
    for_each = local.model_object_arn == null ? [] : [local.model_object_arn]
    content {
      sid       = "ModelData"
      actions   = ["s3:GetObject"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "serve" {
  count  = local.create_role ? 1 : 0
  name   = "${var.name}-serve"
  role   = aws_iam_role.this[0].id
  policy = data.aws_iam_policy_document.serve.json
}

resource "aws_iam_role_policy_attachment" "full_access" {
  count      = local.create_role && var.attach_full_access_policy ? 1 : 0
  role       = aws_iam_role.this[0].name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSageMakerFullAccess"
}

# IAM is eventually consistent: SageMaker may not be able to assume a role created a moment ago.
# A local-exec sleep on terraform_data (built into Terraform >= 1.4) waits without needing the
# hashicorp/time provider, so `terraform init` works from an offline plugin mirror.
resource "terraform_data" "iam_propagation" {
  count            = local.create_role && var.iam_propagation_seconds > 0 ? 1 : 0
  triggers_replace = [local.role_arn, data.aws_iam_policy_document.serve.json]

  provisioner "local-exec" {
    command = "sleep ${var.iam_propagation_seconds}"
  }

  depends_on = [aws_iam_role_policy.serve, aws_iam_role_policy_attachment.full_access]
}

# ------------------------------------------------------------- SageMaker

resource "aws_sagemaker_model" "this" {
  name               = "${var.name}-${local.model_hash}"
  execution_role_arn = local.role_arn

  primary_container {
    image          = local.image
    model_data_url = var.model_data_url
    environment    = local.environment
  }

  tags = var.tags

  lifecycle {
    create_before_destroy = true
  }

  depends_on = [terraform_data.iam_propagation, aws_iam_role_policy.serve]
}

resource "aws_sagemaker_endpoint_configuration" "this" {
  name = "${var.name}-${local.config_hash}"

  production_variants {
    variant_name           = "AllTraffic"
    model_name             = aws_sagemaker_model.this.name
    initial_instance_count = var.serverless ? null : var.instance_count
    instance_type          = var.serverless ? null : var.instance_type
    initial_variant_weight = var.serverless ? null : 1

    dynamic "serverless_config" {
      for_each = var.serverless ? [1] : []
      content {
        memory_size_in_mb = var.memory_size_mb
        max_concurrency   = var.max_concurrency
      }
    }
  }

  tags = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_sagemaker_endpoint" "this" {
  name                 = var.name
  endpoint_config_name = aws_sagemaker_endpoint_configuration.this.name
  tags                 = var.tags
}
