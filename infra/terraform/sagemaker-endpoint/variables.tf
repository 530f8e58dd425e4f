variable "aws_region" {
  description = "AWS region of the endpoint."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must look like us-east-1 or eu-west-3."
  }
}

variable "name" {
  description = "Endpoint name; the model, endpoint config and role are named after it."
  type        = string
  default     = "embedkit-embeddings"

  validation {
    # 54 characters leave room for the -<8 hex> suffix of model and config names (SageMaker: 63).
    condition     = can(regex("^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,53}$", var.name))
    error_message = "name must be 1-54 letters, digits and hyphens, starting and ending with a letter or digit."
  }
}

variable "image_uri" {
  description = "Container image. null = the Hugging Face PyTorch inference DLC (CPU build) of the region; set the embedkit image's ECR URI to serve embedkit's contracts."
  type        = string
  default     = null

  validation {
    condition     = var.image_uri == null || can(regex("^[0-9]{12}\\.dkr\\.ecr\\.[a-z0-9-]+\\.amazonaws\\.com(\\.cn)?/.+", var.image_uri))
    error_message = "image_uri must be an ECR image URI: <account>.dkr.ecr.<region>.amazonaws.com/<repository>:<tag>."
  }
}

variable "model_id" {
  description = "Hugging Face model id served when model_data_url is null (HF_MODEL_ID for the DLC, EMBEDKIT_MODEL for the embedkit image)."
  type        = string
  default     = "sentence-transformers/all-MiniLM-L6-v2"
}

variable "hf_task" {
  description = "HF_TASK for the Hugging Face DLC."
  type        = string
  default     = "feature-extraction"
}

variable "model_data_url" {
  description = "s3:// URL of a model.tar.gz (embedkit sagemaker package-model); null = load model_id."
  type        = string
  default     = null

  validation {
    condition     = var.model_data_url == null || can(regex("^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+\\.tar\\.gz$", var.model_data_url))
    error_message = "model_data_url must be s3://<bucket>/<key>.tar.gz."
  }
}

variable "environment" {
  description = "Extra container environment (EMBEDKIT_PRECISION, SAGEMAKER_MODEL_SERVER_WORKERS...)."
  type        = map(string)
  default     = {}
}

variable "serverless" {
  description = "true: serverless inference (pay per request, scales to zero); false: real-time instances."
  type        = bool
  default     = true
}

variable "memory_size_mb" {
  description = "Serverless memory in MB (1024-6144 in steps of 1024). vCPUs scale with it."
  type        = number
  default     = 3072

  validation {
    condition     = contains([1024, 2048, 3072, 4096, 5120, 6144], var.memory_size_mb)
    error_message = "memory_size_mb must be one of 1024, 2048, 3072, 4096, 5120, 6144."
  }
}

variable "max_concurrency" {
  description = "Serverless concurrent invocations (1-200; the account quota applies)."
  type        = number
  default     = 2

  validation {
    condition     = var.max_concurrency >= 1 && var.max_concurrency <= 200 && floor(var.max_concurrency) == var.max_concurrency
    error_message = "max_concurrency must be a whole number from 1 to 200."
  }
}

variable "instance_type" {
  description = "Real-time instance type (serverless = false), e.g. ml.m5.xlarge (CPU) or ml.g4dn.xlarge (T4 GPU)."
  type        = string
  default     = "ml.m5.xlarge"

  validation {
    condition     = can(regex("^ml\\.[a-z0-9]+\\.[a-z0-9]+$", var.instance_type))
    error_message = "instance_type must look like ml.m5.xlarge."
  }
}

variable "instance_count" {
  description = "Real-time instances (serverless = false)."
  type        = number
  default     = 1

  validation {
    condition     = var.instance_count >= 1 && floor(var.instance_count) == var.instance_count
    error_message = "instance_count must be a whole number >= 1."
  }
}

variable "role_arn" {
  description = "An existing execution role to use instead of creating one."
  type        = string
  default     = null

  validation {
    condition     = var.role_arn == null || can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:role/.+", var.role_arn))
    error_message = "role_arn must be an IAM role ARN."
  }
}

variable "attach_full_access_policy" {
  description = "Also attach AmazonSageMakerFullAccess to the created role (the original hand-built stack did; the inline least-privilege policy is enough to serve)."
  type        = bool
  default     = false
}

variable "iam_propagation_seconds" {
  description = "Seconds to wait after creating the role before SageMaker uses it (IAM is eventually consistent). 0 = no wait."
  type        = number
  default     = 15

  validation {
    condition     = var.iam_propagation_seconds >= 0 && var.iam_propagation_seconds <= 300
    error_message = "iam_propagation_seconds must be 0-300."
  }
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default     = {}
}
