output "endpoint_name" {
  description = "Name to invoke (EMBEDKIT_SAGEMAKER_ENDPOINT)."
  value       = aws_sagemaker_endpoint.this.name
}

output "endpoint_arn" {
  description = "ARN of the endpoint (for IAM policies of callers)."
  value       = aws_sagemaker_endpoint.this.arn
}

output "role_arn" {
  description = "Execution role of the model (also usable as --sagemaker-role for processing jobs once given S3 rights)."
  value       = local.role_arn
}

output "model_name" {
  value = aws_sagemaker_model.this.name
}

output "endpoint_config_name" {
  value = aws_sagemaker_endpoint_configuration.this.name
}

output "image" {
  description = "The container image serving the endpoint."
  value       = local.image
}

output "invoke_example" {
  description = "A first request from a shell."
  value       = "aws sagemaker-runtime invoke-endpoint --region ${var.aws_region} --endpoint-name ${aws_sagemaker_endpoint.this.name} --content-type application/json --cli-binary-format raw-in-base64-out --body '{\"inputs\": \"hello world\"}' /dev/stdout"
}
